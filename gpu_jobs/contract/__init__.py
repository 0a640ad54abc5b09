"""The contract between ``arena_pipeline`` and ``gpu_jobs`` (DESIGN §10): the bottom of the import graph.

Pure: numpy / pandas only, no Dagster, no torch at import time, so both packages (and the benchmarks)
import it. ``arena_pipeline`` may import ``gpu_jobs.contract``; nothing here imports either package.

- ``schema``: column names and the label index (0 = A wins, 1 = B wins, 2 = tie);
- ``turns``: turn parsing with surrogate repair (one parser: lenient, or strict with ``TurnsError``);
- ``swap``: the A/B swap (one permutation, one frame swap);
- ``metrics``: log loss for hard and soft targets, per-class loss, accuracy (clip 1e-15, renormalise);
- ``atomic``: atomic file writes and directory publishing (write aside, then ``os.replace``);
- ``pipes``: Dagster Pipes on the main process of a Dagster-launched job, a no-op stand-in otherwise.
"""

from gpu_jobs.contract.atomic import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_text,
    fsync_dir,
    publish_dir,
)
from gpu_jobs.contract.metrics import (
    EPS,
    accuracy,
    check_labels,
    check_probs,
    clip_probs,
    log_loss,
    per_class_loss,
    row_losses,
    target_probs,
)
from gpu_jobs.contract.pipes import NoOpPipes, clean_metadata, is_main_process, open_pipes
from gpu_jobs.contract.schema import (
    CLASS_NAMES,
    FOLD_COLUMN,
    GROUP_COLUMN,
    ID_COLUMN,
    LABEL_COLUMNS,
    LABEL_INDEX,
    MODEL_COLUMNS,
    PROB_COLUMNS,
    PROCESSED_COLUMNS,
    SOURCE_COLUMN,
    TARGET_COLUMNS,
    TEXT_COLUMNS,
    WEIGHT_COLUMN,
)
from gpu_jobs.contract.swap import SWAP_COLUMN_PAIRS, SWAP_PERMUTATION, swap_frame, swap_probs
from gpu_jobs.contract.turns import (
    SURROGATE,
    TurnsError,
    fix_surrogates,
    parse_turns,
    parse_turns_fixes,
    repair_surrogates,
)

__all__ = [
    "CLASS_NAMES", "EPS", "FOLD_COLUMN", "GROUP_COLUMN", "ID_COLUMN", "LABEL_COLUMNS", "LABEL_INDEX",
    "MODEL_COLUMNS", "PROB_COLUMNS", "PROCESSED_COLUMNS", "SOURCE_COLUMN", "SURROGATE", "SWAP_COLUMN_PAIRS",
    "SWAP_PERMUTATION", "TARGET_COLUMNS", "TEXT_COLUMNS", "TurnsError", "WEIGHT_COLUMN", "NoOpPipes", "accuracy",
    "atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_parquet", "atomic_write_text",
    "check_labels", "check_probs", "clean_metadata", "clip_probs", "fix_surrogates", "fsync_dir",
    "is_main_process", "log_loss", "open_pipes", "parse_turns", "parse_turns_fixes", "per_class_loss",
    "publish_dir", "repair_surrogates", "row_losses", "swap_frame", "swap_probs", "target_probs",
]
