"""Fold assignment, the processed table, and the checks that guard it.

Folds are ``StratifiedGroupKFold`` on the label, grouped by the normalised first prompt, so the same
prompt never sits on both sides of a split. External labelled sets get fold -1 (train only).
Dict outputs use string keys (fold "-1", "0", ...) so they can go straight into Dagster metadata.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from arena_pipeline.data.clean import parse_turns
from gpu_jobs.contract.ties import TIES_COLUMN, ties_possible
from arena_pipeline.data.schema import (
    CLASS_NAMES,
    FOLD_COLUMN,
    GROUP_COLUMN,
    ID_COLUMN,
    LABEL_COLUMNS,
    PROCESSED_COLUMNS,
    SOURCE_COLUMN,
    TEXT_COLUMNS,
    DataError,
)


def label_index(df: pd.DataFrame) -> np.ndarray:
    """Class index per row from the one-hot label columns: 0 = A wins, 1 = B wins, 2 = tie."""
    return np.asarray(df[list(LABEL_COLUMNS)].to_numpy(dtype=np.float64).argmax(axis=1), dtype=np.int64)


def assign_folds(df: pd.DataFrame, *, n_folds: int = 4, seed: int = 42) -> pd.Series:
    """Fold number (0..n_folds-1) per row: ``StratifiedGroupKFold(n_folds, shuffle=True,
    random_state=seed)`` on ``label_index(df)``, grouped by ``df["group"]``. Same data and seed ->
    same folds. Returns an int64 Series aligned with ``df.index``, named ``fold``."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    n_groups = df[GROUP_COLUMN].nunique()
    if n_groups < n_folds:
        raise DataError(
            "processed_folds",
            f"only {n_groups} distinct prompt groups for {n_folds} folds",
            column=GROUP_COLUMN,
            hint="Use fewer folds or more data",
        )
    from sklearn.model_selection import StratifiedGroupKFold  # imported here: slow to import

    folds = np.full(len(df), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    y = label_index(df)
    for k, (_, val_idx) in enumerate(splitter.split(np.zeros((len(df), 1)), y, groups=df[GROUP_COLUMN].to_numpy())):
        folds[val_idx] = k
    return pd.Series(folds, index=df.index, name=FOLD_COLUMN)


def _source_name(frame: pd.DataFrame, position: int) -> str:
    if SOURCE_COLUMN in frame.columns and len(frame):
        values = frame[SOURCE_COLUMN].dropna().astype(str).unique().tolist()
        if values:
            return "+".join(sorted(values))
    return f"external[{position}]"


def build_processed(
    labelled: pd.DataFrame,
    external: list[pd.DataFrame],
    *,
    n_folds: int = 4,
    seed: int = 42,
) -> tuple[pd.DataFrame, dict]:
    """Concatenate cleaned frames (``clean.clean_frame`` output) into the processed table.

    ``labelled`` rows get folds 0..n_folds-1 (``assign_folds``); ``external`` rows get fold -1.
    External rows whose ``group`` also occurs in ``labelled`` are removed (they would put a
    validation prompt into training) and counted. Ids must be unique across all inputs, else a
    ``DataError`` naming both sources. Columns: Contract 1 order, then extra columns (missing extras
    are NaN for rows of other sources).

    Returns ``(frame, info)`` with ``info`` = ``rows_labelled``, ``rows_external_in``,
    ``removed_external_group_overlap`` (total), ``removed_external_group_overlap_by_source``,
    ``rows_external_out``, ``rows_out``, ``n_folds``, ``seed``.
    """
    frames = [labelled, *external]
    names = [_source_name(f, i) for i, f in enumerate(frames)]
    names[0] = _source_name(labelled, 0) if SOURCE_COLUMN in labelled.columns else "labelled"
    required = [ID_COLUMN, *TEXT_COLUMNS, *LABEL_COLUMNS, GROUP_COLUMN]
    for frame, name in zip(frames, names):
        for col in required:
            if col not in frame.columns:
                raise DataError(name, "required column is missing", column=col,
                                hint="Pass frames produced by clean_frame(..., labelled=True)")

    # Ids unique across sources (within one source clean_frame already checked).
    owner: dict[str, str] = {}
    for frame, name in zip(frames, names):
        ids = frame[ID_COLUMN].astype(str)
        dup_inside = ids.duplicated()
        if dup_inside.any():
            raise DataError(name, "duplicate id within one source", row_id=ids[dup_inside].iloc[0],
                            column=ID_COLUMN, hint="Run clean_frame first; make ids unique")
        for row_id in ids.tolist():
            other = owner.get(row_id)
            if other is not None:
                raise DataError(
                    name,
                    f"id also occurs in source '{other}' (ids must be unique across sources '{other}' and '{name}')",
                    row_id=row_id,
                    column=ID_COLUMN,
                    hint="Prefix the ids with the source name",
                )
            owner[row_id] = name

    labelled = labelled.reset_index(drop=True).copy()
    labelled[FOLD_COLUMN] = assign_folds(labelled, n_folds=n_folds, seed=seed).to_numpy()
    labelled_groups = set(labelled[GROUP_COLUMN].tolist())

    parts = [labelled]
    removed_by_source: dict[str, int] = {}
    rows_external_in = 0
    for frame, name in zip(external, names[1:]):
        rows_external_in += len(frame)
        overlap = frame[GROUP_COLUMN].isin(labelled_groups).to_numpy()
        kept = frame.loc[~overlap].reset_index(drop=True).copy()
        if overlap.any():
            if SOURCE_COLUMN in frame.columns:
                for src, count in frame.loc[overlap, SOURCE_COLUMN].astype(str).value_counts().items():
                    removed_by_source[src] = removed_by_source.get(src, 0) + int(count)
            else:
                removed_by_source[name] = removed_by_source.get(name, 0) + int(overlap.sum())
        kept[FOLD_COLUMN] = np.int64(-1)
        parts.append(kept)

    out = pd.concat(parts, ignore_index=True, sort=False)
    for col in LABEL_COLUMNS:
        out[col] = out[col].astype(np.int8)
    if TIES_COLUMN in out.columns:  # rows of sources without the column: ties were possible (bool, no gaps)
        out[TIES_COLUMN] = ties_possible(out, "processed_folds")
    out[FOLD_COLUMN] = out[FOLD_COLUMN].astype(np.int64)
    for col in ("model_a", "model_b"):
        if col in out.columns:
            out[col] = out[col].fillna("").astype("str")
        else:
            out[col] = pd.Series([""] * len(out), dtype="str")
    if SOURCE_COLUMN not in out.columns:
        out[SOURCE_COLUMN] = ""
    extras = [c for c in out.columns if c not in PROCESSED_COLUMNS]
    out = out[list(PROCESSED_COLUMNS) + extras]

    removed_total = int(sum(removed_by_source.values()))
    info = {
        "rows_labelled": int(len(labelled)),
        "rows_external_in": int(rows_external_in),
        "removed_external_group_overlap": removed_total,
        "removed_external_group_overlap_by_source": removed_by_source,
        "rows_external_out": int(rows_external_in - removed_total),
        "rows_out": int(len(out)),
        "n_folds": int(n_folds),
        "seed": int(seed),
    }
    return out, info


# ---------------------------------------------------------------------------------------------
# Checks (used by Dagster asset checks): each returns (passed, details) with JSON-friendly details.


def _examples(values, limit: int = 5, width: int = 80) -> list[str]:
    return [str(v)[:width] for v in list(values)[:limit]]


def check_groups_disjoint(df: pd.DataFrame) -> tuple[bool, dict]:
    """Passes when no group occurs in two different non-negative folds.

    Details also report ``external_groups_in_folds``: groups of fold -1 rows that also occur in a
    fold >= 0 (informational; ``build_processed`` removes those rows)."""
    in_folds = df[df[FOLD_COLUMN] >= 0]
    folds_per_group = in_folds.groupby(GROUP_COLUMN, sort=False)[FOLD_COLUMN].nunique()
    split = folds_per_group[folds_per_group > 1]
    external_groups = set(df.loc[df[FOLD_COLUMN] < 0, GROUP_COLUMN].tolist())
    shared = external_groups & set(folds_per_group.index.tolist())
    details = {
        "n_groups": int(len(folds_per_group)),
        "groups_in_several_folds": int(len(split)),
        "rows_in_split_groups": int(in_folds[GROUP_COLUMN].isin(split.index).sum()),
        "examples": _examples(split.index),
        "external_groups_in_folds": int(len(shared)),
    }
    return len(split) == 0, details


def _shares(labels: np.ndarray) -> np.ndarray:
    if len(labels) == 0:
        return np.zeros(3)
    return np.bincount(labels, minlength=3)[:3] / len(labels)


def check_label_balance(df: pd.DataFrame, tolerance: float = 0.02) -> tuple[bool, dict]:
    """Passes when, in every fold >= 0, each class's share is within ``tolerance`` of its share
    among all fold >= 0 rows. Details: ``overall`` shares, ``max_deviation_per_fold`` (the worst
    class deviation of each fold), ``worst_class_per_fold``, ``max_deviation``, ``tolerance``."""
    in_folds = df[df[FOLD_COLUMN] >= 0]
    y = label_index(in_folds)
    folds = in_folds[FOLD_COLUMN].to_numpy()
    overall = _shares(y)
    per_fold: dict[str, float] = {}
    worst_class: dict[str, str] = {}
    for k in sorted(np.unique(folds).tolist()):
        deviation = np.abs(_shares(y[folds == k]) - overall)
        per_fold[str(k)] = round(float(deviation.max()), 6)
        worst_class[str(k)] = CLASS_NAMES[int(deviation.argmax())]
    max_dev = max(per_fold.values(), default=0.0)
    details = {
        "overall": {name: round(float(s), 6) for name, s in zip(CLASS_NAMES, overall)},
        "max_deviation_per_fold": per_fold,
        "worst_class_per_fold": worst_class,
        "max_deviation": max_dev,
        "tolerance": float(tolerance),
    }
    return bool(max_dev <= tolerance), details


def check_unique_ids(df: pd.DataFrame) -> tuple[bool, dict]:
    """Passes when every ``id`` occurs once."""
    ids = df[ID_COLUMN].astype(str)
    dup = ids[ids.duplicated(keep=False)]
    details = {
        "n_rows": int(len(ids)),
        "n_duplicate_ids": int(dup.nunique()),
        "rows_with_duplicate_ids": int(len(dup)),
        "examples": _examples(dup.unique()),
    }
    return len(dup) == 0, details


def fold_summary(df: pd.DataFrame) -> dict:
    """Rows per fold and label shares per fold (keys are fold numbers as strings, -1 included)."""
    folds = df[FOLD_COLUMN].to_numpy()
    y = label_index(df)
    rows: dict[str, int] = {}
    shares: dict[str, dict[str, float]] = {}
    for k in sorted(np.unique(folds).tolist()):
        mask = folds == k
        rows[str(k)] = int(mask.sum())
        shares[str(k)] = {name: round(float(s), 4) for name, s in zip(CLASS_NAMES, _shares(y[mask]))}
    return {"rows_per_fold": rows, "label_share_per_fold": shares}


def _total_chars(cell: object) -> int:
    return sum(len(turn) for turn in parse_turns(cell))


def length_percentiles(df: pd.DataFrame) -> dict:
    """p50 / p90 / p99 / max of the total characters of prompt + responses (all turns, JSON decoded)."""
    if len(df) == 0:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0}
    total = np.zeros(len(df), dtype=np.int64)
    for col in TEXT_COLUMNS:
        total += np.fromiter((_total_chars(c) for c in df[col].tolist()), dtype=np.int64, count=len(df))
    p50, p90, p99 = np.percentile(total, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": int(total.max())}
