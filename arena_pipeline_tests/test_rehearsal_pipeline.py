"""The `rehearsal` profile as Dagster runs it: vLLM generation (where `.venv-vllm` exists) on multi-turn prompts,
one member trained by two processes through its own accelerate config, and one fold of the whole graph."""

from __future__ import annotations

import dataclasses
import json
import runpy
import shutil
import time

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from arena_pipeline.profile import ACCELERATE_DIR, FULL, REHEARSAL, REPO_ROOT, VLLM_FALLBACK, VLLM_PYTHON, load_profile
from arena_pipeline.resources.launcher import JobLauncher, multi_process
from gpu_jobs.contract.turns import parse_turns

HAS_VLLM = VLLM_PYTHON.exists()


def test_rehearsal_prompts_include_two_and_three_turn_conversations_and_all_are_generated():
    prompts, answers = pd.read_parquet(REHEARSAL.data.prompts), pd.read_parquet(REHEARSAL.data.answers)
    turns = prompts["prompt"].map(lambda p: len(parse_turns(p)))
    assert (turns == prompts["n_turns"]).all() and sorted(turns.value_counts().items()) == [(1, 5), (2, 2), (3, 1)]
    assert len(prompts) <= REHEARSAL.n_generate_prompts  # raw_prompts keeps every one of them
    for row in prompts[turns > 1].itertuples():  # the existing answer covers every turn of its conversation
        (answer,) = answers.loc[answers["question_id"] == row.question_id, "response"]
        assert len(parse_turns(answer)) == row.n_turns
    script = runpy.run_path(str(REPO_ROOT / "scripts" / "make_rehearsal_prompts.py"))  # its files are committed
    SHIPPED, build = script["SHIPPED"], script["build"]
    again_prompts, again_answers = build(pd.read_parquet(SHIPPED / "arena_bench_prompts.parquet"),
                                         pd.read_parquet(SHIPPED / "arena_bench_answers.parquet"))
    pd.testing.assert_frame_equal(again_prompts, prompts)
    pd.testing.assert_frame_equal(again_answers, answers)


def test_rehearsal_generates_with_vllm_where_its_environment_exists_else_says_so():
    with_vllm, without = load_profile("rehearsal", vllm=True), load_profile("rehearsal", vllm=False)
    assert with_vllm.generate_backend == FULL.generate_backend == "vllm"
    assert with_vllm.generator_model == without.generator_model == "tiny:llama3"
    assert not any(d.startswith("generate_backend") for d in with_vllm.differences)
    assert without.generate_backend == "transformers" and without.differences[-1] == VLLM_FALLBACK
    assert REHEARSAL.generate_backend == ("vllm" if HAS_VLLM else "transformers")


def test_one_member_names_its_own_two_process_accelerate_config():
    spec = REHEARSAL.model("llm_llama3_8b_qlora")
    assert spec.accelerate_config == "cpu_2proc.yaml" and spec.launch_options == {"accelerate_config": "cpu_2proc.yaml"}
    assert [m.name for m in REHEARSAL.models if m.accelerate_config] == [spec.name]
    assert all(m.launch_options == {} for m in FULL.models)
    launcher = JobLauncher(accelerate_config=str(ACCELERATE_DIR / "cpu_single.yaml"), environments={"default": "py"})
    own = launcher.command("gpu_jobs.train", ["--fold", "0"], accelerate=True, **spec.launch_options)
    assert own[own.index("--config_file") + 1] == str(ACCELERATE_DIR / "cpu_2proc.yaml")
    other = launcher.command("gpu_jobs.train", ["--fold", "0"], accelerate=True)
    assert other[other.index("--config_file") + 1] == str(ACCELERATE_DIR / "cpu_single.yaml")
    assert multi_process(str(ACCELERATE_DIR / "cpu_2proc.yaml")) and multi_process(str(ACCELERATE_DIR / "gpu_multi.yaml"))
    assert not multi_process(str(ACCELERATE_DIR / "cpu_single.yaml"))
    assert not multi_process(str(ACCELERATE_DIR / "multinode.yaml"))  # several machines: the k8s launcher's


@pytest.mark.slow
def test_rehearsal_one_fold_end_to_end(tmp_path, monkeypatch):
    """The rehearsal graph for fold 0: every asset materialised, a complete submission, vLLM generation (where
    `.venv-vllm` exists) over multi-turn prompts, and the two-process member trained by two processes."""
    from arena_pipeline.definitions import build_definitions
    from arena_pipeline.partitions import fold_range_tags
    from arena_pipeline.resources.storage import ArenaStorage

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    profile = dataclasses.replace(REHEARSAL, folds=(0,))
    defs = build_definitions(profile)
    job = defs.resolve_job_def("full_pipeline_job")
    start = time.time()
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(instance=instance, tags=fold_range_tags(profile), raise_on_error=False)
        wall = time.time() - start
        failures = [e.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert result.success, failures
        keys = defs.resolve_asset_graph().get_all_asset_keys()
        missing = [k.to_user_string() for k in keys if instance.get_latest_materialization_event(k) is None]
        # the evaluation group is evaluation_job's; searches (hpo_*) and generator tuning run on demand
        missing = [k for k in missing if not k.startswith("hpo_") and k != "generator_sft"]
        assert missing == ["loso_evaluation"]
        generated = instance.get_latest_materialization_event(dg.AssetKey("generated_completions"))
        meta = generated.asset_materialization.metadata
    print(f"rehearsal, fold 0, end to end: {wall:.0f} s")
    storage = ArenaStorage(home=str(home / "arena"))
    assert meta["backend"].value == ("vllm" if HAS_VLLM else "transformers")
    completions = pd.read_parquet(storage.data("generated_completions"))
    assert (completions["generator"] == f"{meta['backend'].value}:tiny:llama3").all()
    prompts = pd.read_parquet(storage.data("raw_prompts")).set_index("id")
    answer_turns = completions.set_index("id")["response"].map(lambda r: len(parse_turns(r)))
    assert sorted(prompts.loc[answer_turns.index, "n_turns"].value_counts().items()) == [(1, 5), (2, 2), (3, 1)]
    assert (answer_turns == prompts.loc[answer_turns.index, "n_turns"]).all()  # every turn regenerated
    two_proc = json.loads((storage.job_dir("stage1", "llm_llama3_8b_qlora", 0) / "metrics.json").read_text())
    one_proc = json.loads((storage.job_dir("stage1", "llm_gemma2_9b_qlora", 0) / "metrics.json").read_text())
    assert two_proc["num_processes"] == 2 and one_proc["num_processes"] == 1
    submission = pd.read_csv(storage.bundle_dir / "submission.csv")
    test_ids = pd.read_parquet(profile.test_path).head(profile.max_test_rows)["id"]
    assert sorted(submission["id"].astype(str)) == sorted(test_ids.astype(str))
    probs = submission[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-6) and (probs >= 0).all()
