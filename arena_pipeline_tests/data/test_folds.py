from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from arena_pipeline.data.clean import clean_frame
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
from arena_pipeline.data.load import read_table
from arena_pipeline.data.schema import PROCESSED_COLUMNS, DataError
from arena_pipeline_tests.data.conftest import SHIPPED


@pytest.fixture(scope="module")
def shipped_clean() -> dict[str, pd.DataFrame]:
    out = {}
    for name in ("arena_bench_pairs", "pandalm_test", "llmbar"):
        out[name], _ = clean_frame(read_table(SHIPPED / f"{name}.parquet"), file=f"{name}.parquet", labelled=True)
    return out


def _synthetic(n_groups=40, per_group=5, seed=0, source="syn", id_prefix="s", group_prefix="prompt") -> pd.DataFrame:
    """Cleaned-looking rows: n_groups prompts, per_group pairs each, random labels."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    y = rng.integers(0, 3, size=n)
    onehot = np.eye(3, dtype=np.int8)[y]
    groups = [f"{group_prefix} {g}" for g in range(n_groups) for _ in range(per_group)]
    return pd.DataFrame({
        "id": [f"{id_prefix}{i}" for i in range(n)],
        "prompt": [f'["Prompt {g}"]' for g in groups],
        "response_a": [f'["a{i}"]' for i in range(n)],
        "response_b": [f'["b{i}"]' for i in range(n)],
        "winner_model_a": onehot[:, 0], "winner_model_b": onehot[:, 1], "winner_tie": onehot[:, 2],
        "model_a": "", "model_b": "", "source": source, "group": groups,
    })


def test_label_index():
    df = pd.DataFrame({"winner_model_a": [1, 0, 0, 1], "winner_model_b": [0, 1, 0, 0], "winner_tie": [0, 0, 1, 0]})
    assert label_index(df).tolist() == [0, 1, 2, 0]


def test_assign_folds_groups_and_determinism():
    df = _synthetic()
    folds = assign_folds(df, n_folds=4, seed=42)
    assert folds.name == "fold" and folds.dtype == np.int64
    assert sorted(folds.unique().tolist()) == [0, 1, 2, 3]
    assert (df.assign(fold=folds).groupby("group")["fold"].nunique() == 1).all()
    assert (folds.value_counts() == 50).all()  # 40 groups of 5 -> 10 groups per fold
    assert assign_folds(df, n_folds=4, seed=42).tolist() == folds.tolist()
    other = assign_folds(df, n_folds=4, seed=7)
    assert (other != folds).mean() > 0.3
    assert sorted(assign_folds(df, n_folds=5).unique().tolist()) == [0, 1, 2, 3, 4]


def test_assign_folds_too_few_groups():
    with pytest.raises(DataError, match="only 3 distinct prompt groups for 4 folds"):
        assign_folds(_synthetic(n_groups=3), n_folds=4)


def test_real_arena_bench_pairs_folds(shipped_clean):
    pairs = shipped_clean["arena_bench_pairs"]
    folds = assign_folds(pairs, n_folds=4, seed=42)
    df = pairs.assign(fold=folds)
    assert sorted(folds.unique().tolist()) == [0, 1, 2, 3]
    assert folds.value_counts().sort_index().tolist() == [1460, 1440, 1440, 1460]  # 290 prompts x 20 pairs
    assert len(df) == 5800
    passed, details = check_groups_disjoint(df)
    assert passed and details["n_groups"] == 290 and details["groups_in_several_folds"] == 0
    passed, details = check_label_balance(df, tolerance=0.02)
    assert passed
    assert details["overall"] == {"a": round(2218 / 5800, 6), "b": round(2300 / 5800, 6), "tie": round(1282 / 5800, 6)}
    assert details["max_deviation"] < 0.01  # measured 0.006
    assert set(details["max_deviation_per_fold"]) == {"0", "1", "2", "3"}
    summary = fold_summary(df)
    assert summary["rows_per_fold"] == {"0": 1460, "1": 1440, "2": 1440, "3": 1460}
    for shares in summary["label_share_per_fold"].values():
        assert abs(shares["a"] - 0.3824) < 0.02 and abs(shares["tie"] - 0.2210) < 0.02
        assert abs(sum(shares.values()) - 1) < 1e-3


def test_build_processed_shipped(shipped_clean):
    out, info = build_processed(
        shipped_clean["arena_bench_pairs"], [shipped_clean["pandalm_test"], shipped_clean["llmbar"]]
    )
    assert info == {
        "rows_labelled": 5800, "rows_external_in": 1632, "removed_external_group_overlap": 0,
        "removed_external_group_overlap_by_source": {}, "rows_external_out": 1632, "rows_out": 7432,
        "n_folds": 4, "seed": 42,
    }
    assert tuple(out.columns[: len(PROCESSED_COLUMNS)]) == PROCESSED_COLUMNS
    assert {"score_a", "votes_a", "subset"} <= set(out.columns)  # extras kept
    assert out["fold"].value_counts().sort_index().to_dict() == {-1: 1632, 0: 1460, 1: 1440, 2: 1440, 3: 1460}
    assert out.loc[out["fold"] == -1, "source"].value_counts().to_dict() == {"pandalm_testset_v1": 881, "llmbar": 751}
    assert out["winner_model_a"].dtype == np.int8 and out["fold"].dtype == np.int64
    assert all(check(out)[0] for check in (check_groups_disjoint, check_label_balance, check_unique_ids))
    # folds of the labelled rows do not depend on the external sets
    alone = assign_folds(shipped_clean["arena_bench_pairs"]).tolist()
    assert out.loc[out["fold"] >= 0, "fold"].tolist() == alone


def test_build_processed_removes_leaking_external_rows():
    labelled = _synthetic(n_groups=20, per_group=4)
    external = _synthetic(n_groups=10, per_group=3, seed=1, source="ext", id_prefix="e", group_prefix="other")
    external.loc[external.index[:6], "group"] = ["prompt 0"] * 3 + ["prompt 5"] * 3  # 2 groups shared
    out, info = build_processed(labelled, [external], n_folds=4, seed=42)
    assert info["removed_external_group_overlap"] == 6
    assert info["removed_external_group_overlap_by_source"] == {"ext": 6}
    assert info["rows_external_out"] == 24 and info["rows_out"] == 80 + 24
    assert (out.loc[out["source"] == "ext", "fold"] == -1).all()
    assert not set(out.loc[out["fold"] == -1, "group"]) & set(out.loc[out["fold"] >= 0, "group"])
    assert check_groups_disjoint(out)[1]["external_groups_in_folds"] == 0


def test_build_processed_id_collision_names_both_sources():
    labelled = _synthetic(n_groups=8, source="arena")
    external = _synthetic(n_groups=4, seed=3, source="pandalm", id_prefix="p")
    external.loc[2, "id"] = "s7"
    with pytest.raises(DataError) as info:
        build_processed(labelled, [external])
    assert info.value.row_id == "s7"
    assert str(info.value) == (
        "pandalm: row id=s7: column 'id': id also occurs in source 'arena' (ids must be unique across sources "
        "'arena' and 'pandalm'). Prefix the ids with the source name."
    )


# --- the checks fail on crafted bad folds ---------------------------------------------------


def _with_folds(df, seed=42):
    return df.assign(fold=assign_folds(df, n_folds=4, seed=seed))


def test_check_groups_disjoint_fails_on_split_group():
    df = _with_folds(_synthetic())
    row = df.index[df["group"] == "prompt 3"][0]
    df.loc[row, "fold"] = (df.loc[row, "fold"] + 1) % 4
    passed, details = check_groups_disjoint(df)
    assert not passed
    assert details["groups_in_several_folds"] == 1
    assert details["rows_in_split_groups"] == 5
    assert details["examples"] == ["prompt 3"]
    # a fold -1 row sharing a group is reported but is not a split across folds
    ok = _with_folds(_synthetic())
    ok.loc[0, "fold"] = -1
    passed, details = check_groups_disjoint(ok)
    assert passed and details["external_groups_in_folds"] == 1


def test_check_label_balance_fails_on_skewed_fold():
    n = 400
    labels = np.array([0, 1, 2, 0] * (n // 4))  # overall a 0.5, b 0.25, tie 0.25
    folds = np.repeat([0, 1, 2, 3], n // 4)
    df = pd.DataFrame({"winner_model_a": (labels == 0).astype(int), "winner_model_b": (labels == 1).astype(int),
                       "winner_tie": (labels == 2).astype(int), "fold": folds})
    passed, details = check_label_balance(df)
    assert passed and details["max_deviation"] == 0.0
    # fold 2: 10 of its A labels become B -> fold 2 a share 0.40, overall a share 0.475
    idx = np.flatnonzero((folds == 2) & (labels == 0))[:10]
    df.loc[idx, ["winner_model_a", "winner_model_b"]] = [0, 1]
    passed, details = check_label_balance(df, tolerance=0.02)
    assert not passed
    assert details["overall"] == {"a": 0.475, "b": 0.275, "tie": 0.25}
    assert details["max_deviation_per_fold"] == {"0": 0.025, "1": 0.025, "2": 0.075, "3": 0.025}
    assert details["worst_class_per_fold"]["2"] == "a"
    assert details["max_deviation"] == 0.075
    assert check_label_balance(df, tolerance=0.08)[0]
    # fold -1 rows are ignored by the balance check
    extra = df.iloc[:50].assign(fold=-1, winner_model_a=0, winner_model_b=0, winner_tie=1)
    assert check_label_balance(pd.concat([df, extra]))[1]["overall"] == details["overall"]


def test_check_unique_ids_fails_on_duplicates():
    df = _synthetic(n_groups=4)
    assert check_unique_ids(df) == (True, {"n_rows": 20, "n_duplicate_ids": 0, "rows_with_duplicate_ids": 0,
                                           "examples": []})
    df.loc[[3, 9], "id"] = "s0"
    passed, details = check_unique_ids(df)
    assert not passed
    assert details == {"n_rows": 20, "n_duplicate_ids": 1, "rows_with_duplicate_ids": 3, "examples": ["s0"]}


def test_fold_summary_and_length_percentiles():
    df = pd.DataFrame({
        "prompt": ['["ab"]', '["abcd", "ef"]', '["x"]', '["y"]'],
        "response_a": ['["a"]', '["", "1234"]', '["x"]', '["y"]'],
        "response_b": ['["b"]', '["12", null]', '["x"]', '["y"]'],
        "winner_model_a": [1, 0, 1, 0], "winner_model_b": [0, 1, 0, 0], "winner_tie": [0, 0, 0, 1],
        "fold": [0, 0, 1, -1],
    })
    assert fold_summary(df) == {
        "rows_per_fold": {"-1": 1, "0": 2, "1": 1},
        "label_share_per_fold": {"-1": {"a": 0.0, "b": 0.0, "tie": 1.0}, "0": {"a": 0.5, "b": 0.5, "tie": 0.0},
                                 "1": {"a": 1.0, "b": 0.0, "tie": 0.0}},
    }
    # totals: 4, 12, 3, 3 characters
    assert length_percentiles(df) == {"p50": 3.5, "p90": pytest.approx(9.6), "p99": pytest.approx(11.76), "max": 12}


def test_length_percentiles_shipped(shipped_clean):
    stats = length_percentiles(shipped_clean["arena_bench_pairs"])
    assert stats["p50"] == 3703.0  # the median SOURCES.md reports
    assert stats["max"] == 125591
    assert stats["p50"] < stats["p90"] < stats["p99"] < stats["max"]
