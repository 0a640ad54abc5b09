from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "shipped"

KAGGLE_TRAIN_COLUMNS = [
    "id", "model_a", "model_b", "prompt", "response_a", "response_b",
    "winner_model_a", "winner_model_b", "winner_tie",
]
KAGGLE_TEST_COLUMNS = ["id", "prompt", "response_a", "response_b"]


@pytest.fixture(scope="session")
def pairs_raw() -> pd.DataFrame:
    """The shipped arena_bench_pairs file, as stored (5800 rows)."""
    return pd.read_parquet(SHIPPED / "arena_bench_pairs.parquet")


@pytest.fixture(scope="session")
def pairs_sample(pairs_raw) -> pd.DataFrame:
    """24 real rows covering all three labels (8 each), in file order of first occurrence."""
    parts = [pairs_raw[pairs_raw[col] == 1].head(8) for col in ("winner_model_a", "winner_model_b", "winner_tie")]
    return pd.concat(parts).sort_index().reset_index(drop=True)


@pytest.fixture()
def sample(pairs_sample) -> pd.DataFrame:
    return pairs_sample.copy()
