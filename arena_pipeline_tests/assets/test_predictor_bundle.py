"""predictor_bundle: refuses a test_path its own writes would destroy, before it writes anything; scores the
test file through launched `gpu_jobs.predict` jobs with the same numbers as the in-process `predict` path."""

import hashlib
import json
import shutil

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from arena_pipeline.assets.predictor_bundle import build_bundle_asset
from arena_pipeline.bundle import score_frame
from arena_pipeline.profile import SHIPPED, SMOKE
from arena_pipeline.data.clean import clean_frame
from arena_pipeline.data.load import read_table
from arena_pipeline.resources.launcher import JobLauncher
from arena_pipeline.resources.asset_files import AssetFiles
from arena_pipeline.resources.storage import ArenaStorage, OverwriteError, atomic_write_parquet
from arena_pipeline.resources.tracking import MlflowTracking


@pytest.mark.parametrize("case", ["last_submission", "symlink_into_bundle"])
def test_bundle_refuses_a_test_path_inside_the_bundle(tmp_path, case):
    storage = ArenaStorage(home=str(tmp_path / "arena"))
    storage.bundle_dir.mkdir(parents=True)
    target = storage.bundle_dir / "submission.csv"
    shutil.copy(SHIPPED / "pandalm_test.parquet", target)  # real bytes; only their identity matters here
    test_path = target
    if case == "symlink_into_bundle":
        test_path = tmp_path / "test.csv"
        test_path.symlink_to(target)
    atomic_write_parquet(pd.read_parquet(SHIPPED / "pandalm_test.parquet").head(4), storage.data("processed_folds"))
    before = hashlib.sha256(target.read_bytes()).hexdigest()
    with pytest.raises(OverwriteError, match="test_path") as err:
        dg.materialize([dg.AssetSpec("processed_folds"), build_bundle_asset(SMOKE)],
                       resources={"storage": storage, "io_manager": AssetFiles(storage=storage), "launcher": JobLauncher(),
                                  "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")},
                       run_config={"ops": {"predictor_bundle": {"config": {"test_path": str(test_path)}}}})
    assert str(target) in str(err.value) and str(test_path) in str(err.value)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in storage.bundle_dir.parent.iterdir()) == ["bundle", "data"]  # nothing written beside


@pytest.mark.slow
def test_bundle_scores_the_test_file_through_launched_jobs(smoke_run, tmp_path):
    home = tmp_path / "arena"
    shutil.copytree(smoke_run["storage"].root, home, ignore=shutil.ignore_patterns("bundle", "loso", "scratch"))
    storage = ArenaStorage(home=str(home))
    rows = pd.read_parquet(SHIPPED / "pandalm_test.parquet").head(20)
    rows[["id", "prompt", "response_a", "response_b"]].to_csv(tmp_path / "test.csv", index=False)
    result = dg.materialize(
        [dg.AssetSpec("processed_folds"), build_bundle_asset(SMOKE)],
        resources={"storage": storage, "io_manager": AssetFiles(storage=storage), "launcher": JobLauncher(),
                   "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")},
        run_config={"ops": {"predictor_bundle": {"config": {"test_path": str(tmp_path / "test.csv")}}}})
    assert result.success
    # one launched gpu_jobs.predict per member fold of the bundle, each leaving its output file
    launched = sorted(p.name for p in (home / "scratch" / "bundle_scoring").glob("*.parquet")
                      if p.name != "rows.parquet" and not p.stem.endswith("_tta"))
    models = json.loads((storage.bundle_dir / "bundle.json").read_text())["models"]
    manifest_models = [f"{key.replace('/', '_')}_fold{fold}.parquet" for key, folds in models.items() for fold in folds]
    assert launched == sorted(manifest_models) and launched
    submission = pd.read_csv(storage.bundle_dir / "submission.csv")
    frame, _ = clean_frame(read_table(tmp_path / "test.csv"), file="test.csv", labelled=False, dedupe=False)
    in_process = score_frame(storage.bundle_dir, frame)
    assert submission["id"].astype(str).tolist() == frame["id"].astype(str).tolist()
    np.testing.assert_allclose(submission[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy(), in_process,
                               atol=1e-6)
