"""predictor_bundle with quantize=int8: the submission is scored by launched `gpu_jobs.predict --quantize int8`
jobs, and bundle.json records what each job reported (not the plan)."""

import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from arena_pipeline.assets.predictor_bundle import build_bundle_asset
from arena_pipeline.bundle import score_frame
from arena_pipeline.profile import SMOKE
from arena_pipeline.resources.launcher import JobLauncher
from arena_pipeline.resources.asset_files import AssetFiles
from arena_pipeline.resources.storage import ArenaStorage
from arena_pipeline.resources.tracking import MlflowTracking
from arena_pipeline_tests.gpu_jobs.test_quantize import real_rows, train_small_minilm
from gpu_jobs.quantize import DYNAMIC_INT8

MODEL = "cross_encoder_minilm"
pytestmark = pytest.mark.slow  # trains a small MiniLM, then one launched predict job


def test_bundle_scores_int8_through_launched_jobs_and_records_it(tmp_path):
    storage = ArenaStorage(home=str(tmp_path / "arena"))
    job_dir = storage.job_dir("stage1", MODEL, 0)
    train_small_minilm(job_dir / "model")
    (job_dir / "job.json").write_text(json.dumps({"data_version": "test"}))
    storage.data("processed_folds").parent.mkdir(parents=True, exist_ok=True)
    real_rows(4).to_parquet(storage.data("processed_folds"))
    name = f"stage1/{MODEL}"
    spec = {"members": [{"name": name, "stage": "stage1", "model": MODEL, "tta": False}], "weights": {name: 1.0},
            "temperature": 1.0, "fitted_blend_log_loss_cv": 1.0, "fitted_blend_log_loss_in_sample": 1.0,
            "member_log_loss": {name: 1.0}, "class_prior_log_loss": 1.09, "oof_mean_tie": 0.3}
    storage.ensemble("final_ensemble").parent.mkdir(parents=True, exist_ok=True)
    storage.ensemble("final_ensemble").write_text(json.dumps(spec))
    rows = real_rows(6)
    rows[["id", "prompt", "response_a", "response_b"]].to_csv(tmp_path / "test.csv", index=False)
    result = dg.materialize(
        [dg.AssetSpec("processed_folds"), build_bundle_asset(SMOKE)],
        resources={"storage": storage, "io_manager": AssetFiles(storage=storage), "launcher": JobLauncher(),
                   "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")},
        run_config={"ops": {"predictor_bundle": {"config": {"test_path": str(tmp_path / "test.csv"),
                                                             "quantize": "int8"}}}})
    assert result.success
    quantization = json.loads((storage.bundle_dir / "bundle.json").read_text())["quantization"]
    record = quantization["members"][f"{name}/fold0"]
    assert quantization["mode"] == "int8" and record["method"] == DYNAMIC_INT8 and "planned" not in record
    meta = result.asset_materializations_for_node("predictor_bundle")[0].metadata
    assert meta["quantization"].value == quantization
    submission = pd.read_csv(storage.bundle_dir / "submission.csv")
    in_process = score_frame(storage.bundle_dir, rows)  # the bundle's own mode: int8
    np.testing.assert_allclose(submission[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy(), in_process,
                               atol=1e-5)
