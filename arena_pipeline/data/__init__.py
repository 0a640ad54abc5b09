"""Data layer: reading (``load``), cleaning (``clean``), folds and checks (``folds``).

See docs/architecture.md, Contract 1, for the processed table these functions produce.
"""

from arena_pipeline.data.clean import CleaningReport, clean_frame, parse_turns, prompt_group
from arena_pipeline.data.folds import (
    assign_folds,
    build_processed,
    check_groups_disjoint,
    check_label_balance,
    check_unique_ids,
    fold_summary,
    label_index,
    length_percentiles,
)
from arena_pipeline.data.load import read_predictions, read_table
from arena_pipeline.data.schema import LABEL_COLUMNS, PROB_COLUMNS, TEXT_COLUMNS, DataError

__all__ = [
    "LABEL_COLUMNS",
    "PROB_COLUMNS",
    "TEXT_COLUMNS",
    "CleaningReport",
    "DataError",
    "assign_folds",
    "build_processed",
    "check_groups_disjoint",
    "check_label_balance",
    "check_unique_ids",
    "clean_frame",
    "fold_summary",
    "label_index",
    "length_percentiles",
    "parse_turns",
    "prompt_group",
    "read_predictions",
    "read_table",
]
