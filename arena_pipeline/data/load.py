"""Reading pair tables and prediction files from the formats people actually have.

``read_table`` returns the file's columns as they are (no cleaning: that is ``clean.clean_frame``),
with ``id`` as strings. Every failure to read is a one-line ``DataError`` naming the file.
"""

from __future__ import annotations

import json
import lzma
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from arena_pipeline.data.schema import ID_COLUMN, LABEL_COLUMNS, PROB_COLUMNS, TEXT_COLUMNS, DataError

_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zip", ".zst"}
# What a truncated or corrupt compressed stream raises (gzip: BadGzipFile / zlib.error / EOFError,
# bz2: OSError / ValueError / EOFError, xz: LZMAError / EOFError).
_DECOMPRESS_ERRORS = (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error)
SUM_TOLERANCE = 1e-3


def _format_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _ids_as_str(df: pd.DataFrame) -> pd.DataFrame:
    """Turn the ``id`` column into strings (whole floats lose their ".0": 7.0 -> "7")."""
    if ID_COLUMN not in df.columns:
        return df
    ids = df[ID_COLUMN]
    if pd.api.types.is_float_dtype(ids.dtype):
        finite = ids.dropna().to_numpy()
        if len(finite) and np.all(np.mod(finite, 1) == 0):
            ids = ids.astype("Int64")
    values = [None if pd.isna(v) else str(v) for v in ids.tolist()]
    try:
        df[ID_COLUMN] = pd.Series(values, index=df.index, dtype="str")
    except UnicodeEncodeError:  # an id holding a lone surrogate: keep Python objects
        df[ID_COLUMN] = pd.Series(values, index=df.index, dtype=object)
    return df


def _frame_from_columns(columns: dict[str, list]) -> pd.DataFrame:
    """Build a frame column by column; a column whose strings cannot be stored as UTF-8 (lone
    surrogates) stays ``object`` so that cleaning can count and repair it."""
    data = {}
    for name, values in columns.items():
        try:
            data[name] = pd.Series(values)
        except UnicodeEncodeError:
            data[name] = pd.Series(values, dtype=object)
    return pd.DataFrame(data)


def _read_csv(path: Path) -> pd.DataFrame:
    # Only empty cells are missing: a response that reads "NA" or "null" is text, not a gap.
    dtype = {ID_COLUMN: str, **{c: str for c in TEXT_COLUMNS}, "model_a": str, "model_b": str}
    try:
        # index_col=False: when every row has one field more than the header, pandas would otherwise
        # make the first field the index and shift every cell one column to the left, silently.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            df = pd.read_csv(path, dtype=dtype, keep_default_na=False, na_values=[""], encoding="utf-8",
                             index_col=False)
    except pd.errors.EmptyDataError:
        raise DataError(path, "the CSV file is empty", hint="Write a header row and at least one row") from None
    except pd.errors.ParserError as exc:
        raise DataError(
            path,
            f"cannot parse the CSV ({_first_line(exc)}); the file looks truncated or has an unterminated quote",
            hint="Re-export or re-download the file completely",
        ) from None
    except UnicodeDecodeError as exc:
        raise DataError(
            path, f"the CSV is not valid UTF-8 (byte offset {exc.start})", hint="Re-encode the file as UTF-8"
        ) from None
    except ImportError as exc:  # e.g. .zst without the zstandard package
        raise DataError(path, f"cannot decompress ({_first_line(exc)})",
                        hint="Install the missing package or decompress the file") from None
    except _DECOMPRESS_ERRORS as exc:
        if path.suffix.lower() not in _COMPRESSION_SUFFIXES:
            if isinstance(exc, OSError):
                raise DataError(path, f"cannot read the file ({_first_line(exc)})",
                                hint="Check the file and its permissions") from None
            raise
        raise DataError(path, f"cannot decompress ({_first_line(exc)}); the file looks truncated or corrupt",
                        hint="Re-create or re-download the file") from None
    for warning in caught:
        if issubclass(warning.category, pd.errors.ParserWarning):
            raise DataError(
                path,
                f"the rows have more fields than the header ({len(df.columns)} column names): "
                f"{_first_line(warning.message)}",
                hint="Name every column in the header, or remove the delimiter at the end of each row",
            )
    # A file cut in the middle of its last row parses "fine": outside quotes the last cells are
    # missing; inside a quoted cell pandas takes the cell as ended at the end of the file. Only a file
    # without a final newline can be cut like that; then check for a missing last cell, an odd
    # number of quote characters (the file ends inside a quoted cell), or a last text cell whose
    # JSON list does not end (cut between the two quotes of an escaped "").
    if path.suffix.lower() == ".csv" and len(df) and not _ends_with_newline(path):
        row_id = df[ID_COLUMN].iloc[-1] if ID_COLUMN in df.columns else None
        last = df.iloc[-1, -1]
        if df.shape[1] > 1 and pd.isna(last):
            problem = "the last row ends early (the cell is missing and the file has no final newline)"
        elif _count_quotes(path) % 2:
            problem = "the file ends inside this quoted cell (no closing quote, no final newline)"
        elif df.columns[-1] in TEXT_COLUMNS and isinstance(last, str) and last.lstrip().startswith("[") \
                and not _is_json(last):
            problem = "the last cell's JSON list does not end and the file has no final newline"
        else:
            problem = None
        if problem:
            raise DataError(path, f"{problem}; the file looks truncated", row_id=row_id,
                            column=str(df.columns[-1]), hint="Re-export or re-download the file completely")
    return df


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(size - 1, 0))
        return fh.read(1) in (b"\n", b"\r")


def _count_quotes(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(block.count(b'"') for block in iter(lambda: fh.read(1 << 24), b""))


def _read_bytes(path: Path) -> bytes:
    suffix = path.suffix.lower()
    try:
        if suffix == ".gz":
            import gzip

            return gzip.decompress(path.read_bytes())
        if suffix == ".bz2":
            import bz2

            return bz2.decompress(path.read_bytes())
        if suffix == ".xz":
            return lzma.decompress(path.read_bytes())
    except _DECOMPRESS_ERRORS as exc:
        raise DataError(path, f"cannot decompress ({_first_line(exc)}); the file looks truncated or corrupt",
                        hint="Re-create or re-download the file") from None
    if suffix in _COMPRESSION_SUFFIXES:
        raise DataError(path, f"'{suffix}' compression is not supported for JSON lines",
                        hint="Use .gz, .bz2 or .xz, or decompress the file")
    return path.read_bytes()


def _read_jsonl(path: Path) -> pd.DataFrame:
    """JSON Lines (one object per line) or, for ``.json``, also a JSON array of objects.

    Parsed with the standard ``json`` module so that a lone surrogate escape reaches cleaning
    (``pandas.read_json`` silently deletes it).
    """
    try:
        text = _read_bytes(path).decode("utf-8-sig")  # a leading byte order mark is not part of the JSON
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not valid UTF-8 (byte offset {exc.start})",
                        hint="Re-encode the file as UTF-8") from None
    records: list = []
    stripped = text.lstrip()
    if not stripped:
        raise DataError(path, "the file is empty", hint="Write one JSON object per row")
    too_deep = "JSON nested too deeply to read (thousands of levels)"
    if stripped.startswith("["):
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"invalid JSON array ({exc.msg} at line {exc.lineno})",
                            hint="Fix or re-export the file") from None
        except RecursionError:
            raise DataError(path, too_deep, hint="Fix or re-export the file") from None
    else:
        # Lines end at "\n" only: str.splitlines() would also cut at U+2028, U+0085, \x1c.., which
        # JSON writers (ensure_ascii=False) leave unescaped inside strings.
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(
                    path,
                    f"line {lineno} is not valid JSON ({exc.msg}, column {exc.colno}); the file may be truncated",
                    hint="Fix or re-export the file (one JSON object per line)",
                ) from None
            except RecursionError:
                raise DataError(path, f"line {lineno}: {too_deep}", hint="Fix or re-export the file") from None
    if not all(isinstance(r, dict) for r in records):
        raise DataError(path, "every JSON line must be an object ({...})", hint="Write one JSON object per row")
    columns: dict[str, list] = {}
    for i, record in enumerate(records):
        for key in record:
            if key not in columns:
                columns[key] = [None] * i
        for key, values in columns.items():
            values.append(record.get(key))
    return _frame_from_columns(columns)


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        # Reading does not check that string columns hold valid UTF-8; a damaged file would fail
        # much later, deep inside pandas. Check everything here.
        table.validate(full=True)
        return table.to_pandas()
    except Exception as exc:  # noqa: BLE001 - ArrowInvalid, ArrowNotImplementedError, OSError, ...: all unreadable
        raise DataError(
            path,
            f"cannot read as parquet ({_first_line(exc)})",
            hint="The file is corrupt or not parquet; re-create it",
        ) from None


def _read_hf_dir(path: Path, split: str) -> pd.DataFrame:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError / custom errors
        raise DataError(
            path,
            f"cannot load as a Hugging Face dataset directory ({_first_line(exc)})",
            hint="Pass a directory written by Dataset.save_to_disk, or a data file",
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                path, f"split '{split}' not found (splits: {', '.join(ds.keys())})", hint="Pass split=<one of them>"
            )
        ds = ds[split]
    return ds.to_pandas()


def _read_hf_hub(name: str, split: str) -> pd.DataFrame:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise DataError(
            f"hf://{name}",
            f"cannot load dataset '{name}' split '{split}' ({_first_line(exc)})",
            hint="Check the dataset name, the split and network access, or save it locally and pass the file",
        ) from None
    return ds.to_pandas()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def read_table(source: str | Path, *, split: str = "train") -> pd.DataFrame:
    """Read a pair table from ``.csv``, ``.parquet``, ``.jsonl``/``.json`` or a Hugging Face dataset.

    - ``.csv``: the Kaggle LMSYS layout (``train.csv``: id, model_a, model_b, prompt, response_a,
      response_b, winner_model_a, winner_model_b, winner_tie; ``test.csv``: id, prompt, response_a,
      response_b) or any CSV with a header. Only empty cells count as missing.
    - ``.parquet``; ``.jsonl`` (and ``.json`` as lines, or a JSON array of objects). Compressed
      variants work as well (``.csv.gz``, ``.jsonl.gz`` / ``.bz2`` / ``.xz``).
    - a directory written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` picks ``split``);
      ``"hf://<name>"`` loads ``datasets.load_dataset(name, split=split)``.

    ``id`` comes back as strings. Columns are otherwise returned as read; validation and
    normalisation are ``clean.clean_frame``'s job. Raises ``DataError`` (one line, naming the file)
    for a missing, truncated, corrupt or unsupported file.
    """
    if isinstance(source, str) and source.startswith("hf://"):
        return _ids_as_str(_read_hf_hub(source[len("hf://"):], split))
    path = Path(source)
    if not path.exists():
        raise DataError(path, "file not found", hint="Check the path (relative paths are resolved from "
                        f"{Path.cwd()})")
    if path.is_dir():
        df = _read_hf_dir(path, split)
    else:
        suffix = _format_suffix(path)
        if suffix == ".csv":
            df = _read_csv(path)
        elif suffix == ".parquet" or suffix == ".pq":
            df = _read_parquet(path)
        elif suffix in (".jsonl", ".json", ".ndjson"):
            df = _read_jsonl(path)
        else:
            raise DataError(
                path,
                f"unsupported file type '{suffix or path.name}'",
                hint="Use .csv, .parquet, .jsonl/.json or a saved Hugging Face dataset directory",
            )
    return _ids_as_str(df)


def read_predictions(path: str | Path) -> pd.DataFrame:
    """Read and validate a prediction file: ``id`` + ``p_a, p_b, p_tie`` (or ``winner_model_a,
    winner_model_b, winner_tie`` holding probabilities, as in a Kaggle submission).

    Returns a frame with ``id`` (str) and ``p_a, p_b, p_tie`` (float64) first, the file's other
    columns (e.g. ``fold``) after them; ``winner_*`` columns are renamed to ``p_*``. Every
    probability must be finite and in [0, 1] and each row must sum to 1 within 1e-3; ids must be
    unique. Violations raise ``DataError`` naming the file, the first bad row id and the column.
    """
    df = read_table(path)
    file = str(path)
    if ID_COLUMN not in df.columns:
        raise DataError(file, "required column is missing", column=ID_COLUMN,
                        hint=f"Add an id column (found: {', '.join(map(str, df.columns))})")
    if all(c in df.columns for c in PROB_COLUMNS):
        cols = PROB_COLUMNS
    elif all(c in df.columns for c in LABEL_COLUMNS):
        cols = LABEL_COLUMNS
    else:
        missing = [c for c in PROB_COLUMNS if c not in df.columns]
        raise DataError(
            file,
            f"no probability columns: expected {', '.join(PROB_COLUMNS)} or {', '.join(LABEL_COLUMNS)}",
            column=missing[0],
            hint=f"Rename the probability columns (found: {', '.join(map(str, df.columns))})",
        )
    ids = df[ID_COLUMN]
    if ids.isna().any():
        raise DataError(file, "missing id", row_id=f"<row {int(np.flatnonzero(ids.isna())[0])}>", column=ID_COLUMN,
                        hint="Give every row an id")
    dup = ids.duplicated(keep="first")
    if dup.any():
        raise DataError(file, f"duplicate id ({int(dup.sum())} repeated rows)", row_id=ids[dup].iloc[0],
                        column=ID_COLUMN, hint="Write each id once")
    out = df.rename(columns=dict(zip(cols, PROB_COLUMNS)))
    for col, orig in zip(PROB_COLUMNS, cols):
        values = pd.to_numeric(out[col], errors="coerce")
        bad_type = values.isna() & out[col].notna()
        if bad_type.any():
            i = int(np.flatnonzero(bad_type.to_numpy())[0])
            raise DataError(file, f"value {out[col].iloc[i]!r} is not a number", row_id=ids.iloc[i], column=orig,
                            hint="Write probabilities as numbers")
        arr = values.to_numpy(dtype=np.float64, na_value=np.nan)
        not_finite = ~np.isfinite(arr)
        if not_finite.any():
            i = int(np.flatnonzero(not_finite)[0])
            raise DataError(file, f"probability is {arr[i]} ({int(not_finite.sum())} such rows)", row_id=ids.iloc[i],
                            column=orig, hint="Probabilities must be finite; fix the model output or drop the row")
        outside = (arr < 0) | (arr > 1)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise DataError(file, f"probability {arr[i]:g} is outside [0, 1] ({int(outside.sum())} such rows)",
                            row_id=ids.iloc[i], column=orig,
                            hint="Write probabilities (apply softmax to logits)")
        out[col] = arr
    total = out[list(PROB_COLUMNS)].to_numpy().sum(axis=1)
    off = np.abs(total - 1.0) > SUM_TOLERANCE
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise DataError(
            file,
            f"probabilities sum to {total[i]:.6g}, not 1 within {SUM_TOLERANCE:g} ({int(off.sum())} such rows)",
            row_id=ids.iloc[i],
            column=",".join(cols),
            hint="Normalise each row to sum to 1",
        )
    ordered = [ID_COLUMN, *PROB_COLUMNS]
    return out[ordered + [c for c in out.columns if c not in ordered]].reset_index(drop=True)
