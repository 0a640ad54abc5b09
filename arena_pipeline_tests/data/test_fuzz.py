"""Property-based tests (hypothesis) for the data layer: loaders, cleaning and prediction files.

The property, for every generated input: it ends either in a cleaned frame whose rows are all
accounted for (``rows_in - rows_out == sum(removed)``, each text column a ``json.dumps(list[str])``
that encodes as UTF-8, equal turn counts, and every row equal to what an independent reference of
the documented rules expects), or in a one-line ``DataError`` that names the file and, where one row
is at fault, that row's id and the column, and the row really is at fault. Nothing else may escape
(no KeyError / ArrowInvalid / RecursionError / EOFError from deep inside pandas, pyarrow or json).

``ARENA_FUZZ_EXAMPLES`` sets the number of examples per test (default 60).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import math
import os
import tempfile
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, example, given, note, settings
from hypothesis import strategies as st

from arena_pipeline.data import clean as clean_module
from arena_pipeline.data.clean import clean_frame, parse_turns
from arena_pipeline.data.load import read_predictions, read_table
from arena_pipeline.data.schema import LABEL_COLUMNS, PROB_COLUMNS, TEXT_COLUMNS, DataError
from arena_pipeline_tests.data.conftest import KAGGLE_TEST_COLUMNS, KAGGLE_TRAIN_COLUMNS, SHIPPED

FUZZ = settings(
    max_examples=int(os.environ.get("ARENA_FUZZ_EXAMPLES", "60")),
    deadline=None,  # 2 shared cores: timings are noise
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
FILE = "fuzz/train.csv"  # the name clean_frame is told; the stem "train" is the default source

# ---------------------------------------------------------------------------------------------
# Strategies


ANY_CHAR = st.characters(exclude_categories=())  # every code point, lone surrogates included
SAFE_CHAR = st.characters(exclude_categories=("Cs",))  # UTF-8 encodable
any_text = st.text(ANY_CHAR, max_size=12)
safe_text = st.text(SAFE_CHAR, max_size=12)
HUGE = "lorem ipsum dolor sit amet " * 4_000  # 108k characters: over the "long text" flag
TRICKY = [
    "", " ", "\t\n", "NA", "null", "None", "nan", "NaN", "[]", "[null]", "[[]]", "[{}]", "{}", '"quoted"',
    "1", "-0", "1e400", "true", '["a"', '["a", 1, null, [2], {"k": "v"}]', '"\\ud83d"', '["\\ud83d"]',
    '["\\udc00\\ud83d"]', '["\\ud83d\\ude00"]', '["a\\u0000b"]', "\x00", "a\r\nb", '"', ",", "\ufeff[\"bom\"]",
    "\u2028", HUGE, json.dumps([HUGE, "x"]),
]


def _deep(depth: int, close: bool) -> str:
    return "[" * depth + '"x"' + ("]" * depth if close else "")


json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=True, allow_infinity=True), any_text
)
json_value = st.recursive(
    json_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=2), max_leaves=6
)
# a string cell as it would sit in a file: a JSON list (escaped or raw surrogates), other JSON, plain text
string_cell = st.one_of(
    st.tuples(st.lists(any_text, min_size=1, max_size=3), st.booleans()).map(lambda t: json.dumps(t[0], ensure_ascii=t[1])),
    st.tuples(st.lists(json_value, max_size=4), st.booleans()).map(lambda t: json.dumps(t[0], ensure_ascii=t[1])),
    st.tuples(json_value, st.booleans()).map(lambda t: json.dumps(t[0], ensure_ascii=t[1])),
    any_text,
    st.sampled_from(TRICKY),
    st.tuples(st.integers(1, 5000), st.booleans()).map(lambda t: _deep(*t)),
)
# a cell as it may sit in an in-memory frame (parquet list columns, numpy arrays, wrong types)
object_cell = st.one_of(
    st.none(),
    st.just(float("nan")),
    st.just(pd.NA),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.binary(max_size=12),
    st.lists(json_value, max_size=3),
    st.lists(any_text, max_size=3).map(tuple),
    st.lists(any_text, max_size=3).map(lambda v: np.array(v, dtype=object)),
    st.lists(safe_text, min_size=1, max_size=3).map(np.array),
    st.lists(st.one_of(st.none(), st.binary(max_size=4), st.floats(), safe_text), max_size=3),
    st.integers(-5, 5).map(np.int64),
    st.floats().map(np.float64),
    st.dictionaries(safe_text, json_scalar, max_size=2),
)
text_cell = st.one_of(string_cell, string_cell, object_cell)

_NAN = float("nan")
# (value, number it stands for if accepted, must be rejected: True / False / None = either is fine)
LABEL_POOL = [
    (0, 0, False), (1, 1, False), (0.0, 0, False), (1.0, 1, False), ("0", 0, False), ("1", 1, False),
    ("1.0", 1, False), (True, 1, False), (False, 0, False), (np.int8(1), 1, False), (np.float32(0), 0, False),
    ("1e0", 1, False), (b"1", 1, None), (" 1", 1, None),
    (2, None, True), (-1, None, True), (0.5, None, True), (1 + 1e-9, None, True), ("yes", None, True),
    ("", None, True), (None, None, True), (_NAN, None, True), (math.inf, None, True), ("nan", None, True),
    ([1], None, True),
]
ID_POOL = ["1", 1, 1.0, "a", "a ", "", "x\ny", None, _NAN, pd.NA, "\ud800", "a\udc00b", b"a", np.int64(7), "7"]


@st.composite
def pair_frames(draw, labelled: bool = True, cell=text_cell, label_pool=LABEL_POOL, id_pool=ID_POOL,
                extras: bool = True):
    """A pair table with a ``_row`` column (its input position) to trace rows through cleaning."""
    n = draw(st.integers(0, 6))
    id_mode = draw(st.sampled_from(["str", "int", "pool"]))
    if id_mode == "str":
        ids = draw(st.lists(any_text, min_size=n, max_size=n, unique=True))
    elif id_mode == "int":
        ids = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=n, max_size=n, unique=True))
    else:
        ids = draw(st.lists(st.sampled_from(id_pool), min_size=n, max_size=n))
    # a few distinct texts, re-used so that duplicates (and conflicting labels) show up
    k = draw(st.integers(1, max(n, 1)))
    distinct = [[draw(cell) for _ in TEXT_COLUMNS] for _ in range(k)]
    picks = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    data: dict[str, list] = {"id": ids}
    for j, col in enumerate(TEXT_COLUMNS):
        data[col] = [distinct[p][j] for p in picks]
    if labelled:
        mode = draw(st.sampled_from(["int", "float", "str", "bool", "pool"]))
        classes = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
        for j, col in enumerate(LABEL_COLUMNS):
            if mode == "pool":
                data[col] = [draw(st.sampled_from(label_pool))[0] for _ in range(n)]
            else:
                one = {"int": (0, 1), "float": (0.0, 1.0), "str": ("0", "1"), "bool": (False, True)}[mode]
                data[col] = [one[int(c == j)] for c in classes]
    if extras:
        for col in ("model_a", "model_b", "source"):
            if draw(st.booleans()):
                data[col] = draw(st.lists(st.one_of(any_text, st.none(), st.integers(), st.binary(max_size=4)),
                                          min_size=n, max_size=n))
    data["_row"] = list(range(n))
    frame = pd.DataFrame({c: pd.Series(v, dtype=object) for c, v in data.items()})
    if draw(st.integers(0, 9)) == 0:  # now and then a required column is missing
        required = ["id", *TEXT_COLUMNS, *(LABEL_COLUMNS if labelled else ())]
        frame = frame.drop(columns=[draw(st.sampled_from(required))])
    return frame


# ---------------------------------------------------------------------------------------------
# An independent reference of the documented cleaning rules (clean_frame's docstring)


def _missing(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _fix(text: str) -> str:
    """Unpaired surrogates -> U+FFFD; a high + low pair -> its character."""
    out, i = [], 0
    while i < len(text):
        o = ord(text[i])
        if 0xD800 <= o <= 0xDBFF and i + 1 < len(text) and 0xDC00 <= ord(text[i + 1]) <= 0xDFFF:
            out.append(chr(0x10000 + ((o - 0xD800) << 10) + (ord(text[i + 1]) - 0xDC00)))
            i += 2
            continue
        out.append("\ufffd" if 0xD800 <= o <= 0xDFFF else text[i])
        i += 1
    return "".join(out)


def _item_ref(x) -> str:
    if isinstance(x, str):
        return x
    if _missing(x):
        return ""
    if isinstance(x, bytes):
        return x.decode("utf-8", "replace")
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, (list, tuple, dict)):
        return json.dumps(x, ensure_ascii=False, default=str)
    if isinstance(x, (bool, int, float)):
        return json.dumps(x)
    return str(x)


def turns_ref(cell) -> list[str]:
    if isinstance(cell, bytes):
        cell = cell.decode("utf-8", "replace")
    if isinstance(cell, (list, tuple, np.ndarray)):
        items = list(cell)
    elif _missing(cell):
        return [""]
    elif isinstance(cell, str):
        try:
            value = json.loads(cell)
        except (ValueError, RecursionError):  # plain text, or nested too deep to decode: the text as is
            return [_fix(cell)]
        if isinstance(value, list):
            items = value
        elif value is None:
            return [""]
        else:
            return [_fix(value if isinstance(value, str) else cell)]
    else:
        items = [cell]
    try:
        return [_fix(_item_ref(item)) for item in items] or [""]
    except RecursionError:
        return [_fix(cell)] if isinstance(cell, str) else [_fix(str(cell))]


def _text_ref(v) -> str:
    if _missing(v):
        return ""
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    return _fix(str(v))


def _one_line(text: object) -> str:
    return " ".join(str(text).split()).encode("utf-8", "backslashreplace").decode("utf-8")


def _has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def _label_info(value):
    for v, number, reject in LABEL_POOL:
        if type(v) is type(value) and (v == value or (_missing(v) and _missing(value))):
            return number, reject
    if _missing(value):
        return None, True
    if isinstance(value, (bool, np.bool_)):
        return int(value), False
    if isinstance(value, (int, float, np.integer, np.floating)):
        return (int(value), False) if value in (0, 1) else (None, True)
    if isinstance(value, str):  # text the file held: how pandas reads it as a number is its business
        try:
            number = float(value)
        except ValueError:
            return None, None
        return (int(number), None) if number in (0, 1) else (None, True)
    return None, None


def _id_text(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def faults_ref(df: pd.DataFrame, labelled: bool):
    """(definite faults, possible faults, label class per row if accepted); a fault is
    (row id or None, column)."""
    definite, possible = set(), set()
    required = ["id", *TEXT_COLUMNS, *(LABEL_COLUMNS if labelled else ())]
    for col in required:
        if col not in df.columns:
            definite.add((None, col))
    if definite:
        return definite, possible, None
    raw_ids = df["id"].tolist()
    for v in raw_ids:
        if _missing(v):
            definite.add((None, "id"))
    ids = [None if _missing(v) else _id_text(v) for v in raw_ids]
    counts = Counter(i for i in ids if i is not None)
    for i in ids:
        if i is not None and counts[i] > 1:
            definite.add((i, "id"))
        if i is not None and _has_surrogate(i):
            definite.add((i, "id"))
    classes = None
    if labelled:
        classes = []
        for r, row_id in enumerate(ids):
            numbers = []
            for col in LABEL_COLUMNS:
                number, reject = _label_info(df[col].iloc[r])
                if reject is True:
                    definite.add((row_id, col))
                elif reject is None:
                    possible.add((row_id, col))
                numbers.append(number)
            if all(x is not None for x in numbers) and sum(numbers) != 1:
                for col in LABEL_COLUMNS:
                    definite.add((row_id, col))
            classes.append(int(np.argmax(numbers)) if all(x is not None for x in numbers) else None)
    return definite, possible, classes


def clean_ref(df: pd.DataFrame, labelled: bool, classes):
    """Expected output rows (input position, three turn lists, class) and removed counts."""
    rows = []
    for r in range(len(df)):
        turns = [turns_ref(df[c].iloc[r]) for c in TEXT_COLUMNS]
        m = max(len(t) for t in turns)
        turns = [t + [""] * (m - len(t)) for t in turns]
        rows.append((r, turns, classes[r] if labelled else None))
    removed = {"duplicate": 0, "conflicting_duplicate_merged": 0}
    by_key: dict[str, list] = {}
    for row in rows:
        by_key.setdefault(json.dumps(row[1], ensure_ascii=False), []).append(row)
    kept = []
    for copies in by_key.values():
        first = copies[0]
        if len(copies) > 1:
            votes = [c[2] for c in copies]
            if labelled and len(set(votes)) > 1:
                counts = np.bincount(votes, minlength=3)
                winner = int(np.argmax(counts)) if int((counts == counts.max()).sum()) == 1 else 2
                first = (first[0], first[1], winner)
                removed["conflicting_duplicate_merged"] += len(copies) - 1
            else:
                removed["duplicate"] += len(copies) - 1
        kept.append(first)
    kept.sort(key=lambda row: row[0])
    return kept, removed


# ---------------------------------------------------------------------------------------------
# The checks


def check_data_error(exc: DataError, file: str) -> str:
    msg = str(exc)
    assert len(msg.splitlines()) == 1, msg
    msg.encode("utf-8")  # printable / loggable
    assert msg.startswith(f"{file}: "), msg
    assert exc.file == file
    if exc.row_id is not None:
        assert f"row id={_one_line(exc.row_id)}: " in msg, msg
        assert exc.column is not None, msg
    if exc.column is not None:
        assert f"column '{exc.column}'" in msg, msg
    return msg


def _error_matches(exc: DataError, faults: set) -> bool:
    columns = set((exc.column or "").split(","))
    if exc.row_id is None:
        return any(row is None and col in columns for row, col in faults)
    return any(row == exc.row_id and col in columns for row, col in faults)


def check_clean(df: pd.DataFrame, file: str = FILE, labelled: bool = True):
    """Run clean_frame and check the outcome against the reference; returns the cleaned frame or None."""
    note(f"input: {df.to_dict('list')!r}")
    definite, possible, classes = faults_ref(df, labelled)
    try:
        out, report = clean_frame(df.copy(), file=file, labelled=labelled)
    except DataError as exc:
        check_data_error(exc, file)
        assert definite or possible, f"no fault in the input, yet: {exc}"
        assert _error_matches(exc, definite | possible), f"the error names no faulty row/column: {exc}"
        return None
    assert not definite, f"clean_frame accepted rows at fault: {sorted(definite, key=str)[:3]}"

    # counts
    assert report.rows_in == len(df)
    assert report.rows_out == len(out)
    assert report.rows_in - report.rows_out == sum(report.removed.values())
    # every text column: json.dumps(list[str]), UTF-8, equal turn counts
    for i in range(len(out)):
        lengths = set()
        for col in TEXT_COLUMNS:
            cell = out[col].iloc[i]
            assert isinstance(cell, str)
            cell.encode("utf-8")
            turns = json.loads(cell)
            assert isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)
            assert json.dumps(turns, ensure_ascii=False) == cell
            lengths.add(len(turns))
        assert len(lengths) == 1
    for col in ("id", "model_a", "model_b", "source", "group"):
        for value in out[col].tolist():
            assert isinstance(value, str)
            value.encode("utf-8")

    # the rows themselves
    kept, removed = clean_ref(df, labelled, classes)
    assert report.removed == removed
    assert out["_row"].tolist() == [row[0] for row in kept]
    raw_ids = df["id"].tolist()
    for i, (r, turns, cls) in enumerate(kept):
        assert out["id"].iloc[i] == _id_text(raw_ids[r])
        for col, expected in zip(TEXT_COLUMNS, turns):
            assert json.loads(out[col].iloc[i]) == expected, (col, df[col].iloc[r])
        assert out["group"].iloc[i] == " ".join(turns[0][0].lower().split())
        if labelled:
            assert out[list(LABEL_COLUMNS)].iloc[i].tolist() == [int(cls == j) for j in range(3)]
        for col in ("model_a", "model_b"):
            expected = _text_ref(df[col].iloc[r]) if col in df.columns else ""
            assert out[col].iloc[i] == expected
        source = _text_ref(df["source"].iloc[r]) if "source" in df.columns else ""
        assert out["source"].iloc[i] == (source or Path(file).name.split(".")[0])
    if labelled:
        for col in LABEL_COLUMNS:
            assert out[col].dtype == np.int8
    return out


# ---------------------------------------------------------------------------------------------
# parse_turns and clean_frame on in-memory frames


@FUZZ
@given(text_cell)
@example("[" * 100_000)
@example(_deep(3000, True))
@example(["\ud83d", None, b"\xff", [np.nan]])
def test_parse_turns_never_raises(cell):
    turns = parse_turns(cell)
    assert isinstance(turns, list) and turns
    for turn in turns:
        assert isinstance(turn, str)
        turn.encode("utf-8")
    assert turns == turns_ref(cell)


@FUZZ
@given(pair_frames(labelled=True))
def test_clean_frame_labelled(df):
    check_clean(df, labelled=True)


@FUZZ
@given(pair_frames(labelled=False))
def test_clean_frame_unlabelled(df):
    check_clean(df, labelled=False)


@FUZZ
@given(pair_frames(labelled=True, extras=False))
def test_clean_frame_small_chunks_and_hash_collisions(df):
    """Rows two at a time and one hash for every text triple (duplicates are then told apart only by
    comparing the texts, across chunks): the same output."""
    try:
        expected, expected_report = clean_frame(df.copy(), file=FILE, labelled=True)
    except DataError:
        return
    with mock.patch.object(clean_module, "_CHUNK_ROWS", 2), \
            mock.patch.object(clean_module, "hash", lambda value: 0, create=True):
        got, report = clean_frame(df.copy(), file=FILE, labelled=True)
    pd.testing.assert_frame_equal(got, expected)
    assert report == expected_report


# ---------------------------------------------------------------------------------------------
# Through files: JSON lines, CSV, parquet


def _tmp() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="arena-fuzz-")


def _same_json(a, b) -> bool:
    if _missing(a) and _missing(b):
        return True
    if isinstance(a, np.ndarray):
        a = a.tolist()
    if isinstance(a, np.generic):
        a = a.item()
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(b, bool) and not isinstance(a, bool):
        return float(a) == float(b) or (math.isnan(float(a)) and math.isnan(float(b)))
    return json.dumps(a) == json.dumps(b)


def _check_read(path: Path, df: pd.DataFrame, expect_error: bool = False, same=_same_json) -> pd.DataFrame | None:
    """read_table on a file written from ``df``: an error (one line, naming the file) only when
    expected; otherwise the cells as written."""
    try:
        got = read_table(path)
    except DataError as exc:
        check_data_error(exc, str(path))
        assert expect_error, f"unexpected: {exc}"
        return None
    assert not expect_error, "read a file that should have been refused"
    assert list(got.columns) == list(df.columns)
    assert len(got) == len(df)
    for col in df.columns:
        if col == "id":
            continue
        for a, b in zip(got[col].tolist(), df[col].tolist()):
            assert same(a, b), (col, a, b)
    return got


json_cell = st.one_of(string_cell, st.lists(any_text, max_size=3), json_scalar, json_value)


@FUZZ
@given(
    pair_frames(cell=json_cell, label_pool=[p for p in LABEL_POOL if not isinstance(p[0], (bytes, np.generic))],
                id_pool=["1", 1, "a", None, "\ud800", "", "x\ny"], extras=False),
    st.sampled_from(["lines", "array", "lines.gz", "lines.xz"]),
    st.booleans(),
    st.booleans(),
)
def test_jsonl_files(df, layout, ensure_ascii, bom):
    records = [{k: v for k, v in zip(df.columns, row)} for row in df.itertuples(index=False)]
    text_of = lambda r: json.dumps(r, ensure_ascii=ensure_ascii)  # noqa: E731
    text = json.dumps(records, ensure_ascii=ensure_ascii) if layout == "array" else "\n".join(map(text_of, records))
    data = (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass")  # raw surrogates: invalid UTF-8
    invalid = _has_surrogate(text)
    suffix = {"lines": ".jsonl", "array": ".json", "lines.gz": ".jsonl.gz", "lines.xz": ".jsonl.xz"}[layout]
    if layout == "lines.gz":
        data = gzip.compress(data)
    elif layout == "lines.xz":
        data = lzma.compress(data)
    with _tmp() as tmp:
        path = Path(tmp) / f"pairs{suffix}"
        path.write_bytes(data)
        if not records:
            try:
                got = read_table(path)
            except DataError as exc:
                check_data_error(exc, str(path))
                return
            assert len(got) == 0
            return
        got = _check_read(path, df, expect_error=invalid)
        if got is not None:
            if "id" in df.columns:
                for a, b in zip(got["id"].tolist(), df["id"].tolist()):
                    assert (_missing(a) and _missing(b)) or a == str(b)
            check_clean(got, file=str(path), labelled=True)


def _write_csv(df: pd.DataFrame, path: Path, encoding: str = "utf-8") -> None:
    buf = io.StringIO()
    # "\r\n": the csv module then quotes every field holding "\r" or "\n" (with "\n" alone it leaves
    # a lone "\r" unquoted, which readers take for a line break)
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(df.columns)
    for row in df.itertuples(index=False):
        writer.writerow(["" if _missing(v) else v for v in row])
    path.write_bytes(buf.getvalue().encode(encoding, "surrogatepass"))


@FUZZ
@given(
    pair_frames(cell=string_cell, label_pool=[p for p in LABEL_POOL if isinstance(p[0], (str, int)) or _missing(p[0])],
                id_pool=["1", "a", "", "x\ny", "\ud800", "1.0", "01"], extras=False),
    st.sampled_from(["utf-8", "utf-8-sig"]),
)
def test_csv_files(df, encoding):
    """Every id and text cell is read back exactly as written (only an empty cell is missing)."""
    with _tmp() as tmp:
        path = Path(tmp) / "train.csv"
        _write_csv(df, path, encoding)
        invalid = any(_has_surrogate(str(v)) for col in df.columns for v in df[col].tolist())
        try:
            got = read_table(path)
        except DataError as exc:
            check_data_error(exc, str(path))
            assert invalid or len(df.columns) == 1, f"unexpected: {exc}"
            return
        assert not invalid, "read a file that is not UTF-8"
        assert list(got.columns) == list(df.columns)
        assert len(got) == len(df)
        for col in ("id", *TEXT_COLUMNS):
            if col in df.columns:
                for a, b in zip(got[col].tolist(), df[col].tolist()):
                    assert _missing(a) if b == "" or _missing(b) else a == str(b), (col, a, b)
        check_clean(got, file=str(path), labelled=True)


@FUZZ
@given(pair_frames(cell=st.one_of(safe_text, st.sampled_from([t for t in TRICKY if not _has_surrogate(t)]),
                                  st.lists(safe_text, max_size=3), st.none()),
                   label_pool=[(0, 0, False), (1, 1, False)], id_pool=["1", "a", "", None, "x\ny"], extras=False))
def test_parquet_files(df):
    columns = {}
    for col in df.columns:
        values = df[col].tolist()
        if col in TEXT_COLUMNS and any(isinstance(v, list) for v in values):
            values = [v if isinstance(v, list) or v is None else [v] for v in values]
        columns[col] = values
    with _tmp() as tmp:
        path = Path(tmp) / "pairs.parquet"
        try:
            table = pa.table(columns)
        except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeEncodeError):  # not storable as parquet
            assume(False)
        pq.write_table(table, path)
        got = read_table(path)
        expected = table.to_pandas()
        check_clean(got, file=str(path), labelled=True)
        assert len(got) == len(expected)


# ---------------------------------------------------------------------------------------------
# Corrupt and truncated files


def _sample_frame(layout: str, n: int = 5) -> pd.DataFrame:
    pairs = pd.read_parquet(SHIPPED / "arena_bench_pairs.parquet").head(n).copy()
    pairs["id"] = np.arange(30192, 30192 + n)
    for col in LABEL_COLUMNS:
        pairs[col] = pairs[col].astype(int)
    return pairs[KAGGLE_TRAIN_COLUMNS if layout == "train" else KAGGLE_TEST_COLUMNS].reset_index(drop=True)


_CACHE: dict[str, object] = {}


def _parquet_bytes() -> bytes:
    if "parquet" not in _CACHE:
        buf = io.BytesIO()
        _sample_frame("train", 24).to_parquet(buf)
        _CACHE["parquet"] = buf.getvalue()
    return _CACHE["parquet"]


def _assert_one_line_error(path: Path, call=read_table) -> DataError:
    with pytest.raises(DataError) as info:
        call(path)
    check_data_error(info.value, str(path))
    return info.value


@FUZZ
@given(st.binary(max_size=3000), st.sampled_from(["", "PAR1", "PAR1+PAR1"]))
@example(b"", "")
def test_random_bytes_as_parquet(data, magic):
    if magic:
        data = b"PAR1" + data + (b"PAR1" if "+" in magic else b"")
    with _tmp() as tmp:
        path = Path(tmp) / "pairs.parquet"
        path.write_bytes(data)
        _assert_one_line_error(path)
        _assert_one_line_error(path, read_predictions)


@FUZZ
@given(st.data())
def test_truncated_parquet(data):
    full = _parquet_bytes()
    cut = data.draw(st.integers(0, len(full) - 1))
    with _tmp() as tmp:
        path = Path(tmp) / "pairs.parquet"
        path.write_bytes(full[:cut])
        msg = str(_assert_one_line_error(path))
        assert "cannot read as parquet" in msg


@FUZZ
@given(st.data())
def test_damaged_parquet(data):
    """Bytes overwritten inside a real file: a DataError or a frame that cleans (never a crash)."""
    full = bytearray(_parquet_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(full) - 1))
        full[at] = data.draw(st.integers(0, 255))
    with _tmp() as tmp:
        path = Path(tmp) / "pairs.parquet"
        path.write_bytes(bytes(full))
        try:
            got = read_table(path)
        except DataError as exc:
            check_data_error(exc, str(path))
            return
        try:
            clean_frame(got, file=str(path), labelled=True)
        except DataError as exc:
            check_data_error(exc, str(path))


def _csv_rows(layout: str) -> tuple[bytes, list[int], pd.DataFrame]:
    """The CSV bytes of a Kaggle-layout file and the byte offset where each line (header, rows) ends."""
    key = f"csv-{layout}"
    if key not in _CACHE:
        df = _sample_frame(layout)
        ends, data = [], b""
        for row in [list(df.columns), *df.astype(object).values.tolist()]:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerow(row)
            data += buf.getvalue().encode("utf-8")
            ends.append(len(data))
        _CACHE[key] = (data, ends, df)
    return _CACHE[key]


@FUZZ
@given(st.sampled_from(["train", "test"]), st.data())
def test_truncated_csv(layout, data):
    """A CSV cut anywhere: a one-line DataError, or (cut at a row boundary) exactly the rows before
    the cut; never a row with missing or shortened cells."""
    full, ends, df = _csv_rows(layout)
    cut = data.draw(st.integers(0, len(full) - 1))
    complete = sum(1 for e in ends[1:] if e - 1 <= cut)  # rows that lost at most their newline
    at_boundary = cut in ends or cut + 1 in ends or cut == 0
    with _tmp() as tmp:
        path = Path(tmp) / f"{layout}.csv"
        path.write_bytes(full[:cut])
        try:
            got = read_table(path)
            clean, _ = clean_frame(got, file=str(path), labelled=layout == "train")
        except DataError as exc:
            check_data_error(exc, str(path))
            return
    assert at_boundary, f"cut at byte {cut} inside a row was read without an error"
    assert len(clean) == complete
    expected = df.head(complete)
    assert clean["id"].tolist() == expected["id"].astype(str).tolist()
    for col in TEXT_COLUMNS:
        assert [json.loads(c) for c in clean[col]] == [json.loads(c) for c in expected[col]]


@FUZZ
@given(st.sampled_from([".csv.gz", ".csv.bz2", ".csv.xz", ".jsonl.gz", ".jsonl.bz2", ".jsonl.xz"]), st.data())
def test_truncated_compressed(suffix, data):
    full, _, df = _csv_rows("train")
    if ".jsonl" in suffix:
        full = "\n".join(json.dumps(r) for r in df.to_dict("records")).encode("utf-8")
    compress = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[suffix.rsplit(".", 1)[1]]
    packed = compress(full)
    cut = data.draw(st.integers(0, len(packed) - 1))
    with _tmp() as tmp:
        path = Path(tmp) / f"train{suffix}"
        path.write_bytes(packed[:cut])
        _assert_one_line_error(path)


@FUZZ
@given(st.sampled_from(["", "id,prompt,response_a,response_b\n"]), st.text(ANY_CHAR, max_size=200),
       st.sampled_from([".csv", ".jsonl", ".json"]))
@example("id,prompt,response_a,response_b\n", "1,a,b,c,d\n2,e,f,g,h\n", ".csv")  # one field too many per row
@example("id,prompt,response_a,response_b\n", "1,a,b\n", ".csv")
@example("", "[" * 50_000, ".json")
@example("", '{"id": ' + "[" * 50_000, ".jsonl")
def test_random_text_files(header, body, suffix):
    """Garbage after a real header: a DataError, or a frame that cleans (and then agrees with the reference)."""
    with _tmp() as tmp:
        path = Path(tmp) / f"pairs{suffix}"
        path.write_bytes((header + body).encode("utf-8", "surrogatepass"))
        try:
            got = read_table(path)
        except DataError as exc:
            check_data_error(exc, str(path))
            return
        if suffix == ".csv" and header and len(got):
            # the cells line up with the header: no field was taken for the index
            assert got.index.equals(pd.RangeIndex(len(got)))
        got["_row"] = np.arange(len(got))
        check_clean(got, file=str(path), labelled=False)


def test_csv_rows_longer_than_header():
    """Found by test_random_text_files: every row one field longer than the header used to shift all
    cells one column to the left (pandas took the first field for the index)."""
    with _tmp() as tmp:
        path = Path(tmp) / "test.csv"
        path.write_text("id,prompt,response_a,response_b\n1,a,b,c,d\n2,e,f,g,h\n", encoding="utf-8")
        msg = str(_assert_one_line_error(path))
        assert "the rows have more fields than the header (4 column names)" in msg


# ---------------------------------------------------------------------------------------------
# Prediction files

PROB_POOL = [0.2, 0.5, 0.3, 1 / 3, 0.0, 1.0, _NAN, math.inf, -math.inf, -0.1, 1.2, 1e-300, "0.5", "abc", None]


@st.composite
def prediction_frames(draw, fmt: str):
    n = draw(st.integers(1, 6))
    ids = draw(st.one_of(
        st.lists(safe_text, min_size=n, max_size=n, unique=True),
        st.lists(st.sampled_from(["a", "b", "", "x\ny", None] + ([1, 2] if fmt != "parquet" else [])),
                 min_size=n, max_size=n),
    ))
    pool = [p for p in PROB_POOL if fmt != "parquet" or isinstance(p, float) or p is None]
    rows = []
    for _ in range(n):
        if draw(st.booleans()):  # a valid row: normalised random weights
            w = draw(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=3, max_size=3))
            total = sum(w)
            rows.append([x / total for x in w] if total > 0 else [1.0, 0.0, 0.0])
        else:
            rows.append([draw(st.sampled_from(pool)) for _ in range(3)])
    columns = PROB_COLUMNS if draw(st.booleans()) else LABEL_COLUMNS
    return pd.DataFrame({"id": pd.Series(ids, dtype=object),
                         **{c: pd.Series([r[j] for r in rows], dtype=object) for j, c in enumerate(columns)}})


def _prob_value(v):
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None if v is None else float(v)


@FUZZ
@given(st.sampled_from(["parquet", "csv", "jsonl"]).flatmap(lambda f: st.tuples(st.just(f), prediction_frames(f))))
def test_read_predictions(case):
    fmt, df = case
    with _tmp() as tmp:
        path = Path(tmp) / f"preds.{fmt}"
        if fmt == "parquet":
            df.assign(**{c: df[c].astype("float64") for c in df.columns[1:]}).assign(
                id=df["id"].astype(object)).to_parquet(path)
        elif fmt == "csv":
            _write_csv(df, path)
        else:
            path.write_text("\n".join(json.dumps(r) for r in df.to_dict("records")), encoding="utf-8")
        # reference: which rows are at fault, and in which column
        cols = list(df.columns[1:])
        faults = set()
        str_ids = [None if _missing(v) or (fmt == "csv" and v == "") else str(v) for v in df["id"].tolist()]
        counts = Counter(i for i in str_ids if i is not None)
        for r, row_id in enumerate(str_ids):
            if row_id is None:
                faults.add((None, "id"))
            elif counts[row_id] > 1:
                faults.add((row_id, "id"))
            values = [_prob_value(df[c].iloc[r]) for c in cols]
            for c, v in zip(cols, values):
                if v is None or not math.isfinite(v) or not 0 <= v <= 1:
                    faults.add((row_id, c))
            if all(v is not None and math.isfinite(v) and 0 <= v <= 1 for v in values):
                if abs(sum(values) - 1) > 1e-3:
                    faults.update((row_id, c) for c in cols)
        try:
            got = read_predictions(path)
        except DataError as exc:
            check_data_error(exc, str(path))
            assert faults, f"no fault, yet: {exc}"
            row = None if (exc.row_id or "").startswith("<row ") else exc.row_id
            assert any(r == row and c in exc.column.split(",") for r, c in faults), (str(exc), faults)
            return
        assert not faults, f"accepted faulty rows: {faults}"
        assert got["id"].tolist() == str_ids
        probs = got[list(PROB_COLUMNS)].to_numpy()
        assert probs.dtype == np.float64 and np.isfinite(probs).all()
        assert ((probs >= 0) & (probs <= 1)).all()
        assert np.allclose(probs.sum(axis=1), 1, atol=1e-3)
        expected = np.array([[_prob_value(df[c].iloc[r]) for c in cols] for r in range(len(df))], dtype=float)
        assert np.allclose(probs, expected, rtol=1e-12, atol=0)
