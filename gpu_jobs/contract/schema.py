"""Column names of the pair tables and the label index, shared by both packages.

The table layouts are the contracts in ``docs/architecture.md``: ``id``, the three text columns (each a
``json.dumps(list[str])``, one item per turn), the three one-hot label columns (or soft ``target_*``
columns), ``model_a``, ``model_b``, ``source``, ``group`` and ``fold``; predictions are ``id`` + ``p_*``.
Every class-indexed array in the project uses the label order below: 0 = A wins, 1 = B wins, 2 = tie.
"""

from __future__ import annotations

ID_COLUMN = "id"
TEXT_COLUMNS = ("prompt", "response_a", "response_b")
LABEL_COLUMNS = ("winner_model_a", "winner_model_b", "winner_tie")  # one-hot human / judge labels
TARGET_COLUMNS = ("target_a", "target_b", "target_tie")  # soft training targets (pseudo labels)
PROB_COLUMNS = ("p_a", "p_b", "p_tie")  # predicted probabilities
MODEL_COLUMNS = ("model_a", "model_b")
SOURCE_COLUMN = "source"
GROUP_COLUMN = "group"
FOLD_COLUMN = "fold"
WEIGHT_COLUMN = "sample_weight"

# Short class names, in label-index order.
CLASS_NAMES = ("a", "b", "tie")
LABEL_INDEX = {name: i for i, name in enumerate(CLASS_NAMES)}  # {"a": 0, "b": 1, "tie": 2}

# Contract 1 column order (extra columns follow these).
PROCESSED_COLUMNS = (
    ID_COLUMN,
    *TEXT_COLUMNS,
    *LABEL_COLUMNS,
    *MODEL_COLUMNS,
    SOURCE_COLUMN,
    GROUP_COLUMN,
    FOLD_COLUMN,
)
