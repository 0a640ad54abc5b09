"""Every within-prompt pair of judged answers, labelled by the judge's scores."""

import numpy as np
import pandas as pd
import pytest

from arena_pipeline.data.clean import clean_frame
from arena_pipeline.data.pairs import answer_pairs
from arena_pipeline.data.schema import DataError
from arena_pipeline.profile import SHIPPED

LABELS = ["winner_model_a", "winner_model_b", "winner_tie"]


@pytest.fixture(scope="module")
def answers() -> pd.DataFrame:
    frame = pd.read_parquet(SHIPPED / "arena_bench_answers.parquet")
    return frame[frame["question_id"].isin(sorted(frame["question_id"].unique())[:6])].reset_index(drop=True)


def test_every_pair_once_labelled_by_score(answers):
    pairs = answer_pairs(answers)
    sizes = answers.dropna(subset=["judge_score"]).groupby("question_id").size()
    assert len(pairs) == int((sizes * (sizes - 1) // 2).sum())
    assert pairs["id"].is_unique
    assert (pairs[LABELS].sum(axis=1) == 1).all()
    diff = pairs["score_a"] - pairs["score_b"]
    assert ((diff > 0) == (pairs["winner_model_a"] == 1)).all()
    assert ((diff == 0) == (pairs["winner_tie"] == 1)).all()
    # random, seeded A/B position: neither side is favoured, and the draw repeats
    assert 0.4 < pairs["winner_model_a"].sum() / (pairs["winner_model_a"].sum() + pairs["winner_model_b"].sum()) < 0.6
    pd.testing.assert_frame_equal(pairs, answer_pairs(answers))


def test_the_shipped_pair_file_is_a_subset(answers):
    shipped = pd.read_parquet(SHIPPED / "arena_bench_pairs.parquet")
    shipped = shipped[shipped["question_id"].isin(answers["question_id"])]
    pairs = answer_pairs(answers)
    key = lambda f: set(zip(f["question_id"], f[["model_a", "model_b"]].min(axis=1), f[["model_a", "model_b"]].max(axis=1)))  # noqa: E731
    assert key(shipped) <= key(pairs)


def test_pairs_pass_the_data_contract(answers):
    cleaned, report = clean_frame(answer_pairs(answers), file="pairs", labelled=True)
    assert len(cleaned) == len(answer_pairs(answers))


def test_bad_score_names_the_row(answers):
    bad = answers.copy()
    bad["judge_score"] = bad["judge_score"].astype(object)
    bad.loc[3, "judge_score"] = "ten"
    with pytest.raises(DataError, match=r"answers.parquet: row question_id=.* column 'judge_score'"):
        answer_pairs(bad, file="answers.parquet")
    with pytest.raises(DataError, match="judge_score"):
        answer_pairs(answers.drop(columns=["judge_score"]), file="answers.parquet")
    missing = answers.copy()
    missing.loc[0, "judge_score"] = np.nan  # an unjudged answer is skipped, not an error
    assert len(answer_pairs(missing)) < len(answer_pairs(answers))
