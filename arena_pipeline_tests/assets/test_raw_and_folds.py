"""Raw-input assets and processed_folds through Dagster: metadata, blocking checks, user files."""

import dagster as dg
import pandas as pd
import pytest

from arena_pipeline.assets.processed_folds import build_folds_asset
from arena_pipeline.assets.raw import build_raw_assets
from arena_pipeline.checks import FOLD_CHECKS
from arena_pipeline.profile import SHIPPED, SMOKE
from arena_pipeline.resources.asset_files import AssetFiles
from arena_pipeline.resources.storage import ArenaStorage
from arena_pipeline.resources.tracking import MlflowTracking


def _materialise(storage, run_config=None, profile=SMOKE):
    assets = [*build_raw_assets(profile), build_folds_asset(profile)]
    resources = {"storage": storage, "io_manager": AssetFiles(storage=storage), "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{storage.root / 'mlflow.db'}")}
    return dg.materialize([*assets, *FOLD_CHECKS], resources=resources, run_config=run_config,
                          raise_on_error=False)


def _meta(result, node):
    return {k: v.value for k, v in result.asset_materializations_for_node(node)[0].metadata.items()}


def test_data_assets_on_shipped_data(tmp_path):
    storage = ArenaStorage(home=str(tmp_path))
    result = _materialise(storage)
    assert result.success
    raw = _meta(result, "raw_labelled")
    assert raw["rows"] == SMOKE.max_labelled_rows
    assert raw["per_file"]["arena_bench_pairs"]["rows_in"] == 5800
    assert set(raw["label_balance"]) == {"a", "b", "tie"}
    external = _meta(result, "raw_external")
    assert external["rows"] == 2 * SMOKE.max_external_rows  # PandaLM + LLMBar, capped per file
    folds = _meta(result, "processed_folds")
    assert folds["rows"] == SMOKE.max_labelled_rows + 2 * SMOKE.max_external_rows
    assert folds["rows_per_fold"]["-1"] == 2 * SMOKE.max_external_rows
    assert sum(v for k, v in folds["rows_per_fold"].items() if k != "-1") == SMOKE.max_labelled_rows
    # a short Markdown image (drawn inline on the asset page) of the plot the MLflow server serves
    assert folds["length_histogram"].startswith("![processed_folds_lengths](http://127.0.0.1:5000/get-artifact?")
    assert len(folds["length_histogram"]) < 1000
    checks = {e.event_specific_data.check_name: e.event_specific_data.passed for e in result.all_events
              if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    assert checks == {"folds_groups_disjoint": True, "folds_label_balance": True, "folds_unique_ids": True}
    frame = pd.read_parquet(storage.data("processed_folds"))
    assert frame.groupby("group")["fold"].nunique().max() == 1
    # LLMBar (the profile's tie-free source) is marked; every other row may be a tie; a plain bool column
    assert frame["ties_possible"].dtype == bool
    assert (~frame["ties_possible"]).sum() == (frame["source"] == "llmbar").sum() > 0
    assert frame.loc[~frame["ties_possible"], "winner_tie"].sum() == 0


def test_user_files_through_run_config(tmp_path):
    """A Kaggle-format train.csv pointed at through run config replaces the shipped default."""
    rows = pd.read_parquet(SHIPPED / "arena_bench_pairs.parquet").sample(400, random_state=0)
    kaggle = rows[["id", "model_a", "model_b", "prompt", "response_a", "response_b",
                   "winner_model_a", "winner_model_b", "winner_tie"]]
    kaggle.to_csv(tmp_path / "train.csv", index=False)
    storage = ArenaStorage(home=str(tmp_path / "state"))
    config = {"ops": {"raw_labelled": {"config": {"paths": [str(tmp_path / "train.csv")], "max_rows_per_file": 0}},
                      "raw_external": {"config": {"paths": [], "max_rows_per_file": 0}}}}
    result = _materialise(storage, config)
    assert result.success
    assert _meta(result, "raw_labelled")["rows"] == 400
    assert _meta(result, "processed_folds")["rows"] == 400


def test_bad_user_file_fails_with_file_row_and_column(tmp_path):
    rows = pd.read_parquet(SHIPPED / "arena_bench_pairs.parquet").head(20)
    rows.loc[5, "winner_model_b"] = 1  # two winners on one row
    rows.to_parquet(tmp_path / "bad.parquet")
    storage = ArenaStorage(home=str(tmp_path / "state"))
    config = {"ops": {"raw_labelled": {"config": {"paths": [str(tmp_path / "bad.parquet")]}}}}
    result = _materialise(storage, config)
    assert not result.success
    message = result.failure_data_for_node("raw_labelled").error.cause.message
    assert "bad.parquet" in message and rows.loc[5, "id"] in message and "winner" in message


@pytest.mark.parametrize("corruption", ["split_group", "duplicate_id"])
def test_fold_checks_fail_on_crafted_bad_folds(tmp_path, corruption):
    storage = ArenaStorage(home=str(tmp_path))
    assert _materialise(storage).success
    frame = pd.read_parquet(storage.data("processed_folds"))
    labelled = frame[frame["fold"] >= 0]
    if corruption == "split_group":
        sizes = labelled["group"].value_counts()
        group = sizes.index[sizes >= 2][0]  # a prompt with several rows, moved half into another fold
        idx = labelled.index[labelled["group"] == group][0]
        frame.loc[idx, "fold"] = (frame.loc[idx, "fold"] + 1) % 4
    else:
        frame.loc[labelled.index[1], "id"] = frame.loc[labelled.index[0], "id"]
    frame.to_parquet(storage.data("processed_folds"))
    check = {"split_group": FOLD_CHECKS[0], "duplicate_id": FOLD_CHECKS[2]}[corruption]
    result = dg.materialize([*build_raw_assets(SMOKE), build_folds_asset(SMOKE), check], resources={"storage": storage, "io_manager": AssetFiles(storage=storage), "mlflow": MlflowTracking()},
                            selection=dg.AssetSelection.checks(check), raise_on_error=False)
    evaluation = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert evaluation and evaluation[0].passed is False


def test_check_results_are_separate_metadata_entries():
    from arena_pipeline.checks import check_metadata

    meta = check_metadata({"max_deviation": 0.01, "overall": {"A": 0.4, "tie": 0.2}, "examples": [],
                           "folds": {"0": {"rows": 12, "passed": True, "teachers": [{"model": "x"}]}}})
    assert set(meta) == {"max_deviation", "overall.A", "overall.tie", "examples", "folds.0.rows", "folds.0.passed",
                         "folds.0.teachers"}
    assert meta["overall.A"].value == 0.4 and meta["folds.0.rows"].value == 12 and meta["folds.0.passed"].value is True
    assert meta["examples"].value == "none"
