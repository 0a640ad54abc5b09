"""Validation, normalisation and de-duplication of pair tables (turn parsing: ``gpu_jobs.contract.turns``).

Every change is counted in a ``CleaningReport``; nothing is dropped without a count.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from gpu_jobs.contract.turns import SURROGATE as _SURROGATE
from gpu_jobs.contract.turns import fix_surrogates as _fix_surrogates
from gpu_jobs.contract.turns import is_missing as _is_missing
from gpu_jobs.contract.turns import parse_turns
from gpu_jobs.contract.turns import parse_turns_fixes as _parse
from gpu_jobs.contract.ties import TIES_COLUMN, ties_possible

from arena_pipeline.data.schema import (
    GROUP_COLUMN,
    ID_COLUMN,
    LABEL_COLUMNS,
    MODEL_COLUMNS,
    SOURCE_COLUMN,
    TEXT_COLUMNS,
    DataError,
)

# A JSON escape of a surrogate (\ud83d, \uDC00, ...); may also match an escaped backslash followed by
# "ud8..", which only sends the cell down the general (slower, same result) path.
_SURROGATE_ESCAPE = r"\\[uU][dD][89a-fA-F]"
_SURROGATE_ANY = re.compile(_SURROGATE.pattern + "|" + _SURROGATE_ESCAPE)
_RAW_DECODE = json.JSONDecoder().raw_decode  # json.loads without whitespace handling: (value, end)
_ENCODE_STR = json.encoder.encode_basestring  # what json.dumps(..., ensure_ascii=False) uses for a str
LONG_TEXT_CHARS = 100_000
_CHUNK_ROWS = 4096  # rows cleaned at a time (their Python strings are freed after each chunk)

# Keys always present in a report (zeros included), so the metadata has a stable shape. Turn parsing
# (``gpu_jobs.contract.turns``) reports its repairs by these names; its "non_text_turn" (a number in a
# list, kept as its JSON text) is not counted as a repair.
REMOVED_KEYS = ("duplicate", "conflicting_duplicate_merged")
FIXED_KEYS = ("lone_surrogate", "null_turn", "non_list_cell", "nested_turn", "empty_turn_list", "turns_padded")
FLAGGED_KEYS = ("empty_prompt", "empty_response", "text_over_100k_chars")


def _encode_turns(turns: list[str]) -> str:
    """``json.dumps(turns, ensure_ascii=False)`` for a list of ``str``, without the per-call encoder set-up."""
    return "[" + ", ".join(map(_ENCODE_STR, turns)) + "]"


def _decode_list(cell: str):
    """The value of a cell written as a JSON array with nothing around it; ``None`` otherwise (the
    general path then decides)."""
    try:
        value, end = _RAW_DECODE(cell)
    except (ValueError, RecursionError):
        return None
    return value if end == len(cell) and type(value) is list else None


def _normalise_prompt_text(text: str) -> str:
    return " ".join(text.lower().split())


def prompt_group(prompt_json: str) -> str:
    """Fold group key: the first turn of the prompt, lowercased, whitespace collapsed, stripped."""
    return _normalise_prompt_text(parse_turns(prompt_json)[0])


@dataclass
class CleaningReport:
    """What ``clean_frame`` did. ``rows_in - rows_out == sum(removed.values())``.

    ``removed``: rows dropped, by reason. ``fixed``: rows changed, by kind of repair (a row counts
    once per kind). ``flagged``: rows kept unchanged but worth knowing about (empty responses,
    texts over 100k characters).
    """

    rows_in: int
    rows_out: int
    removed: dict[str, int]
    fixed: dict[str, int]
    flagged: dict[str, int] = field(default_factory=dict)

    def to_metadata(self) -> dict:
        """Flat, JSON-friendly: ``rows_in``, ``rows_out``, ``removed_total``, ``removed_<k>``,
        ``fixed_<k>``, ``flagged_<k>`` (all ints)."""
        meta: dict[str, int] = {
            "rows_in": int(self.rows_in),
            "rows_out": int(self.rows_out),
            "removed_total": int(sum(self.removed.values())),
        }
        for prefix, counts in (("removed", self.removed), ("fixed", self.fixed), ("flagged", self.flagged)):
            for key, value in counts.items():
                meta[f"{prefix}_{key}"] = int(value)
        return meta


def _name_text(value: object, flags: set[str]) -> str:
    """A model name / source cell as text: "" when missing, bytes decoded, surrogates repaired."""
    if _is_missing(value):
        return ""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    text, fixed = _fix_surrogates(text)
    if fixed:
        flags.add("lone_surrogate")
    return text


def _clean_row(cell_p, cell_a, cell_b, fast: bool, escaped: bool, name_surrogate: bool,
               fixed: dict[str, int], flagged: dict[str, int]) -> tuple[str, str, str, str]:
    """The normalised prompt, response_a, response_b JSON and the group of one row; counts its
    repairs in ``fixed`` and its flags in ``flagged``."""
    turn_lists = None
    if fast:
        tp, ta, tb = _decode_list(cell_p), _decode_list(cell_a), _decode_list(cell_b)
        if (tp and ta and tb and len(tp) == len(ta) == len(tb) and _all_str(tp) and _all_str(ta) and _all_str(tb)
                and not (escaped and _any_surrogate((tp, ta, tb)))):
            turn_lists = (tp, ta, tb)
            if name_surrogate:
                fixed["lone_surrogate"] += 1
    if turn_lists is None:
        parsed = [_parse(cell_p), _parse(cell_a), _parse(cell_b)]
        row_flags = set().union(*(flags for _, flags in parsed))
        if name_surrogate:
            row_flags.add("lone_surrogate")
        turn_lists = [turns for turns, _ in parsed]
        n_turns = max(len(t) for t in turn_lists)
        if any(len(t) != n_turns for t in turn_lists):
            row_flags.add("turns_padded")
            turn_lists = [t + [""] * (n_turns - len(t)) for t in turn_lists]
        for key in row_flags:
            if key in fixed:
                fixed[key] += 1
    prompt, resp_a, resp_b = turn_lists
    if _blank(prompt):
        flagged["empty_prompt"] += 1
    if _blank(resp_a) or _blank(resp_b):
        flagged["empty_response"] += 1
    enc_p, enc_a, enc_b = _encode_turns(prompt), _encode_turns(resp_a), _encode_turns(resp_b)
    # a text is never longer than its JSON: count characters only when the JSON is long
    if len(enc_p) + len(enc_a) + len(enc_b) >= LONG_TEXT_CHARS:
        if sum(len(t) for turns in turn_lists for t in turns) >= LONG_TEXT_CHARS:
            flagged["text_over_100k_chars"] += 1
    return enc_p, enc_a, enc_b, _normalise_prompt_text(prompt[0])


def _is_arrow_str(values: pd.Series) -> bool:
    """A pyarrow-backed string column: valid UTF-8 (no surrogates) or missing, nothing else."""
    dtype = values.dtype
    return isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow"


def _plain_strings(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """``(is_str, escaped)``: cells that are ``str`` without a raw surrogate, and cells that may hold
    a JSON-escaped surrogate (a pair, as ensure_ascii writes an emoji, or a lone one)."""
    if _is_arrow_str(values):  # UTF-8: raw surrogates cannot occur
        escaped = values.str.contains(_SURROGATE_ESCAPE, regex=True).to_numpy(dtype=bool, na_value=True)
        return values.notna().to_numpy(), escaped
    cells = values.tolist()
    is_str = np.fromiter((type(v) is str and _SURROGATE.search(v) is None for v in cells), dtype=bool, count=len(cells))
    escaped = np.fromiter((type(v) is str and _SURROGATE_ANY.search(v) is not None for v in cells), dtype=bool,
                          count=len(cells))
    return is_str, escaped


def _any_surrogate(turn_lists) -> bool:
    for turns in turn_lists:
        for turn in turns:
            if _SURROGATE.search(turn) is not None:
                return True
    return False


def _all_str(items: list) -> bool:
    for item in items:
        if type(item) is not str:
            return False
    return True


def _blank(turns: list[str]) -> bool:
    for turn in turns:
        if turn.strip():
            return False
    return True


def _file_stem(file: str) -> str:
    name = Path(str(file).rstrip("/")).name
    return name.split(".")[0] or name


def _check_columns(df: pd.DataFrame, file: str, labelled: bool) -> None:
    required = [ID_COLUMN, *TEXT_COLUMNS, *(LABEL_COLUMNS if labelled else ())]
    for col in required:
        if col not in df.columns:
            kind = "labelled" if labelled else "unlabelled"
            raise DataError(
                file,
                f"required column is missing ({kind} tables need {', '.join(required)}; "
                f"found {', '.join(map(str, df.columns))})",
                column=col,
                hint="Rename or add the column",
            )


def _check_ids(df: pd.DataFrame, file: str) -> pd.Series:
    ids = df[ID_COLUMN]
    missing = ids.isna().to_numpy()
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise DataError(file, f"the id is missing (row number {i}; {int(missing.sum())} rows without id)",
                        column=ID_COLUMN, hint="Give every row a unique id")
    values = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in ids.tolist()]
    ids = pd.Series(values, index=df.index, dtype=object)
    for value in values:
        if _SURROGATE.search(value) is not None:
            raise DataError(
                file,
                "the id holds an unpaired UTF-16 surrogate (a broken escape such as \\ud83d) and cannot be stored",
                row_id=value,
                column=ID_COLUMN,
                hint="Fix the id in the file",
            )
    dup = ids.duplicated(keep="first").to_numpy()
    if dup.any():
        raise DataError(
            file,
            f"duplicate id ({int(dup.sum())} rows repeat an earlier id)",
            row_id=ids[dup].iloc[0],
            column=ID_COLUMN,
            hint="Make ids unique (e.g. prefix them with the source name) or drop the repeated rows",
        )
    return ids


def _check_labels(df: pd.DataFrame, file: str, ids: pd.Series) -> np.ndarray:
    """Validated one-hot labels as an int8 array of shape (n, 3)."""
    columns = []
    for col in LABEL_COLUMNS:
        raw = df[col]
        values = pd.to_numeric(raw, errors="coerce")
        values = values.to_numpy(dtype=np.float64, na_value=np.nan) if len(values) else np.zeros(0)
        missing = raw.isna().to_numpy()
        if missing.any():
            i = int(np.flatnonzero(missing)[0])
            raise DataError(file, f"the label is missing ({int(missing.sum())} such rows)", row_id=ids.iloc[i],
                            column=col, hint="Fill the label with 0 or 1, or drop the row")
        not_number = np.isnan(values)
        if not_number.any():
            i = int(np.flatnonzero(not_number)[0])
            raise DataError(file, f"label value {raw.iloc[i]!r} is not a number", row_id=ids.iloc[i],
                            column=col, hint="Labels must be 0 or 1")
        bad = (values != 0) & (values != 1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(file, f"label value {values[i]:g} is not 0 or 1 ({int(bad.sum())} such rows)",
                            row_id=ids.iloc[i], column=col,
                            hint="Labels are one-hot: 1 for the winner column, 0 for the other two")
        columns.append(values.astype(np.int8))
    labels = np.stack(columns, axis=1) if columns else np.zeros((0, 3), np.int8)
    winners = labels.sum(axis=1)
    for bad in (winners == 0, winners > 1):
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            set_cols = [c for c, v in zip(LABEL_COLUMNS, labels[i]) if v == 1]
            if set_cols:
                problem, column = f"{len(set_cols)} winners: {' and '.join(set_cols)} are 1", ",".join(set_cols)
            else:
                problem, column = "no winner: all three label columns are 0", ",".join(LABEL_COLUMNS)
            raise DataError(
                file,
                f"{problem} ({int(bad.sum())} such rows)",
                row_id=ids.iloc[i],
                column=column,
                hint="Set exactly one of winner_model_a, winner_model_b, winner_tie to 1",
            )
    return labels


def _mark_ties(result: pd.DataFrame, file: str, labelled: bool, tie_free_sources: tuple[str, ...]) -> None:
    """The ``ties_possible`` column, in place: the file's own (validated), else False for tie-free sources."""
    free = result[SOURCE_COLUMN].isin(list(tie_free_sources)).to_numpy()
    if TIES_COLUMN not in result.columns and not free.any():
        return
    try:
        possible = ties_possible(result, file) if TIES_COLUMN in result.columns else ~free
    except ValueError as error:
        raise DataError(str(error)) from None
    if labelled:
        bad = ~possible & (result[LABEL_COLUMNS[2]].to_numpy() == 1)
        if bad.any():
            raise DataError(file, f"labelled a tie, but its ties_possible is false ({int(bad.sum())} such rows)",
                            row_id=result[ID_COLUMN].iloc[int(np.flatnonzero(bad)[0])], column=TIES_COLUMN,
                            hint="A source without ties cannot have a tie label: fix the label or the column "
                                 "(or the profile's data.tie_free_sources)")
    result[TIES_COLUMN] = possible


def clean_frame(
    df: pd.DataFrame, *, file: str, labelled: bool, source: str | None = None, dedupe: bool = True,
    tie_free_sources: tuple[str, ...] = (),
) -> tuple[pd.DataFrame, CleaningReport]:
    """Validate and normalise one pair table (Contract 1 layout, without ``fold``).

    Validation (a ``DataError`` naming file, row id and column): required columns (``id`` + the
    text columns, + the label columns when ``labelled``), no missing or repeated id, no id holding an
    unpaired surrogate (ids are keys: they are not repaired), labels in
    {0, 1} (ints, Kaggle-style floats 0.0 / 1.0 or numeric strings) with exactly one winner per row.

    Normalisation: the three text columns become ``json.dumps(list[str], ensure_ascii=False)`` with
    the same number of turns (shorter ones padded with "" -> ``fixed["turns_padded"]``); null turns,
    non-list cells, nested turns, empty lists and lone surrogates are repaired and counted in
    ``fixed`` (see ``parse_turns``). Empty prompts / responses are kept and counted in ``flagged``;
    very long texts pass through untouched (``flagged["text_over_100k_chars"]``). ``id`` is str,
    labels int8, ``model_a`` / ``model_b`` "" when missing (bytes decoded; lone surrogates repaired and
    counted like those of the texts), ``source`` = the ``source`` argument if
    given, else the existing column (gaps filled), else the file stem; ``group`` =
    ``prompt_group(prompt)``. Extra columns are kept as they are, after the contract columns.

    De-duplication on identical normalised (prompt, response_a, response_b):
    - same label in every copy (or an unlabelled table) -> keep the first row,
      ``removed["duplicate"]`` += copies - 1;
    - labels disagree -> the copies collapse into the first row, which gets the majority label
      (a tie when no label has a strict majority, e.g. one A and one B vote);
      ``removed["conflicting_duplicate_merged"]`` += copies - 1. Its other columns are the first
      copy's.
    Row order is kept (first occurrences). ``rows_in - rows_out == sum(removed.values())``.
    ``dedupe=False`` skips de-duplication (every row is kept: scoring a test file must answer every
    id); the removed counts are then 0.

    ``ties_possible`` (``gpu_jobs/contract/ties.py``): a file's own column is validated and made boolean;
    without one, rows whose source is in ``tie_free_sources`` get False. A row that cannot be a tie but is
    labelled one is a ``DataError``.
    """
    file = str(file)
    rows_in = len(df)
    _check_columns(df, file, labelled)
    out = df.reset_index(drop=True)
    ids = _check_ids(out, file)
    labels = _check_labels(out, file, ids) if labelled else None

    fixed = dict.fromkeys(FIXED_KEYS, 0)
    flagged = dict.fromkeys(FLAGGED_KEYS, 0)
    n = len(out)
    stem = _file_stem(file)
    # model names (and the source column when no source is given): plain text, "" when missing
    name_columns = [col for col in MODEL_COLUMNS if col in out.columns]
    if source is None and SOURCE_COLUMN in out.columns:
        name_columns.append(SOURCE_COLUMN)
    names: dict[str, list[str]] = {}
    name_surrogate = np.zeros(n, dtype=bool)  # rows whose names had a lone surrogate repaired
    for col in name_columns:
        if _is_arrow_str(out[col]):  # valid UTF-8 strings or missing: nothing to repair
            names[col] = out[col].fillna("").tolist()
            continue
        values = []
        for i, value in enumerate(out[col].tolist()):
            flags: set[str] = set()
            values.append(_name_text(value, flags))
            if flags:
                name_surrogate[i] = True
        names[col] = values

    # Rows whose three text cells are strings take a fast path when they turn out to be non-empty
    # JSON lists of strings of equal length without lone surrogates: nothing to repair there.
    # Every other row takes the general path (_parse); same results.
    fast = np.ones(n, dtype=bool)
    escaped = np.zeros(n, dtype=bool)
    for col in TEXT_COLUMNS:
        is_str, has_escape = _plain_strings(out[col])
        fast &= is_str
        escaped |= has_escape

    # Rows are processed in chunks whose Python strings are freed (the output goes to Arrow arrays
    # chunk by chunk): the memory stays small and warm instead of holding every cell three times.
    # Duplicates are found on the fly (hash of the normalised texts, confirmed by comparing them).
    keep = np.ones(n, dtype=bool)
    kept_rows: list[int] = []  # position among the kept rows -> row
    seen: dict[int, int | list[int]] = {}  # hash of the normalised texts -> position(s) of kept rows
    copies: dict[int, list[int]] = {}  # first row of a duplicated text triple -> all its rows
    chunks: tuple[list, list, list, list] = ([], [], [], [])  # Arrow arrays: prompt, response_a, response_b, group
    done: list[pa.ChunkedArray] = []  # the finished chunks of the three text columns
    fast_rows, escaped_rows, name_rows = fast.tolist(), escaped.tolist(), name_surrogate.tolist()

    def kept_texts(pos: int, chunk_base: int, buffers) -> tuple:
        if pos >= chunk_base:
            return tuple(buffer[pos - chunk_base] for buffer in buffers[:3])
        return tuple(column[pos].as_py() for column in done)

    for start in range(0, n, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, n)
        cells_p, cells_a, cells_b = (out[col].iloc[start:stop].tolist() for col in TEXT_COLUMNS)
        buffers = buf_p, buf_a, buf_b, buf_g = [], [], [], []
        chunk_base = len(kept_rows)
        for j in range(stop - start):
            i = start + j
            enc_p, enc_a, enc_b, group = _clean_row(cells_p[j], cells_a[j], cells_b[j], fast_rows[i],
                                                    escaped_rows[i], name_rows[i], fixed, flagged)
            if dedupe:
                key = hash((enc_p, enc_a, enc_b))
                earlier = seen.get(key)
                if earlier is not None:
                    candidates = earlier if isinstance(earlier, list) else [earlier]
                    same = next((pos for pos in candidates
                                 if kept_texts(pos, chunk_base, buffers) == (enc_p, enc_a, enc_b)), None)
                    if same is not None:
                        first = kept_rows[same]
                        copies.setdefault(first, [first]).append(i)
                        keep[i] = False
                        continue
                    seen[key] = [*candidates, len(kept_rows)]  # same hash, other texts
                else:
                    seen[key] = len(kept_rows)
            kept_rows.append(i)
            buf_p.append(enc_p)
            buf_a.append(enc_a)
            buf_b.append(enc_b)
            buf_g.append(group)
        for chunk, buffer in zip(chunks, buffers):
            chunk.append(pa.array(buffer, type=pa.large_string()))
        if dedupe:
            done = [pa.chunked_array(chunk, type=pa.large_string()) for chunk in chunks[:3]]
        del cells_p, cells_a, cells_b, buffers, buf_p, buf_a, buf_b, buf_g
    del seen, done
    kept = len(kept_rows)

    # De-duplication: the first row of each group of copies stays (with the merged label).
    removed = dict.fromkeys(REMOVED_KEYS, 0)
    for first, rows in copies.items():
        if not labelled:
            removed["duplicate"] += len(rows) - 1
            continue
        classes = labels[rows].argmax(axis=1)
        if np.all(classes == classes[0]):
            removed["duplicate"] += len(rows) - 1
            continue
        counts = np.bincount(classes, minlength=3)
        winner = int(np.argmax(counts)) if int((counts == counts.max()).sum()) == 1 else 2
        labels[first] = np.eye(3, dtype=np.int8)[winner]
        removed["conflicting_duplicate_merged"] += len(rows) - 1

    all_kept = bool(keep.all())

    def kept_list(values: list) -> list:
        return values if all_kept else [v for v, k in zip(values, keep) if k]

    def arrow_str(arrays: list) -> pd.Series:
        return pd.Series(pa.chunked_array(arrays, type=pa.large_string()), dtype="str")

    result = pd.DataFrame({ID_COLUMN: pd.Series(kept_list(ids.tolist()), dtype="str")})
    for col, arrays in zip(TEXT_COLUMNS, chunks[:3]):
        result[col] = arrow_str(arrays)
    if labels is not None:
        for j, col in enumerate(LABEL_COLUMNS):
            result[col] = labels[keep, j]
    for col in MODEL_COLUMNS:
        result[col] = pd.Series(kept_list(names[col]) if col in names else [""] * kept, dtype="str")
    if source is not None:
        result[SOURCE_COLUMN] = pd.Series([source] * kept, dtype="str")
    elif SOURCE_COLUMN in names:
        result[SOURCE_COLUMN] = pd.Series([v or stem for v in kept_list(names[SOURCE_COLUMN])], dtype="str")
    else:
        result[SOURCE_COLUMN] = pd.Series([stem] * kept, dtype="str")
    result[GROUP_COLUMN] = arrow_str(chunks[3])
    for col in out.columns:
        if col not in result.columns:
            result[col] = out[col] if all_kept else out[col].iloc[np.flatnonzero(keep)].reset_index(drop=True)

    _mark_ties(result, file, labelled, tie_free_sources)
    report = CleaningReport(rows_in=rows_in, rows_out=len(result), removed=removed, fixed=fixed, flagged=flagged)
    assert report.rows_in - report.rows_out == sum(removed.values())
    return result, report
