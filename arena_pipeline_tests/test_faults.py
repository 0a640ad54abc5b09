"""Faults at the asset level: training jobs killed mid-epoch and mid-write, a killed launcher, OOM-like failures.

A real training asset of the smoke profile runs in process (``dg.materialize``) while a thread watches the
job's ``OUT.partial`` folder and SIGKILLs the ``gpu_jobs.train`` process at a chosen moment. What must hold:
the asset fails with a message that names SIGKILL, nothing appears at the job's output folder (the only place
downstream assets read), no materialisation or MLflow run is recorded, the downstream ensemble refuses to run,
and executing the asset again succeeds.
"""


import dataclasses
import time

import dagster as dg
import pandas as pd
import pytest

from arena_pipeline.profile import SMOKE
from arena_pipeline.definitions import build_definitions
from arena_pipeline.resources.launcher import JobLauncher, _describe_exit
from arena_pipeline.resources.storage import ArenaStorage
from arena_pipeline.resources.tracking import MlflowTracking
from arena_pipeline_tests import reliability_support as R

MINILM = "stage1_oof_cross_encoder_minilm"
FEATURES = "stage1_oof_features"
FAULT_JOBS = "arena_pipeline_tests.fault_jobs"


@pytest.fixture(scope="module")
def fault_home(tmp_path_factory):
    """One state folder for the module, with processed_folds built (the training assets' input)."""
    home = R.new_home(tmp_path_factory.mktemp("faults_home"))
    with R.dagster_home(home):
        defs = build_definitions(SMOKE)
        with dg.DagsterInstance.get() as instance:
            R.materialise_inputs(defs, instance)
    return home


@pytest.fixture
def home(fault_home, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(fault_home))
    return fault_home


def job_runs(model: str) -> list:
    client = MlflowTracking().client()
    exp = client.get_experiment_by_name("arena-pipeline")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.kind = 'job' and tags.model = '{model}'")


def assert_nothing_published(storage: ArenaStorage, model: str, instance: dg.DagsterInstance, asset: str) -> None:
    out = storage.job_dir("stage1", model, 0)
    assert not out.exists(), f"a killed job left {sorted(p.name for p in out.iterdir())} at {out}"
    assert not (out / "oof.parquet").exists() and not (out / "model").exists()
    assert instance.get_materialized_partitions(dg.AssetKey(asset)) == set()
    # the killed job's MLflow run was opened when it started and is closed as failed, never finished
    assert {r.info.status for r in job_runs(model)} <= {"FAILED", "KILLED"}


def test_training_killed_mid_epoch_and_mid_write_then_rerun_succeeds(home):
    """MiniLM (smoke sizes): SIGKILL after the first optimiser step, then after the model weights appear in
    OUT.partial (the write/predict phase); neither leaves a result; a third execution succeeds."""
    profile = dataclasses.replace(SMOKE, models=(SMOKE.model("cross_encoder_minilm"),))
    defs = build_definitions(profile)
    storage = ArenaStorage()
    out = storage.job_dir("stage1", "cross_encoder_minilm", 0)
    partial = out.with_name(out.name + ".partial")

    def listing() -> dict:
        return {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}

    def history_lines() -> int:
        path = partial / "history.jsonl"
        return len([x for x in path.read_text().splitlines() if x.strip()]) if path.exists() else 0

    with dg.DagsterInstance.get() as instance:
        # 1. mid-epoch: the first history line is out, the epoch (3 steps of 16 rows) is not over
        killer = R.Killer(R.is_train_job, lambda: history_lines() >= 1,
                          snapshot=lambda: {"history_lines": history_lines(), "files": listing()})
        killer.start()
        result = R.materialise(defs, [MINILM], instance, partition_key="0")
        killer.join(timeout=5)
        assert killer.killed is not None, "the training process was never seen"
        assert not result.success
        assert 1 <= killer.state["history_lines"] < 3, killer.state  # really mid-epoch
        assert "model.safetensors" not in " ".join(killer.state["files"])
        description = R.failure_description(result, MINILM)
        assert "gpu_jobs.train exited with code 1: its job process was killed by SIGKILL" in description
        assert "out-of-memory" in description
        assert_nothing_published(storage, "cross_encoder_minilm", instance, MINILM)

        # downstream: the ensemble refuses to run on a missing member instead of reading anything half-made
        blocked = R.materialise(defs, ["stage1_ensemble"], instance)
        assert not blocked.success
        assert "has no OOF predictions" in R.failure_description(blocked, "stage1_ensemble")

        # 2. mid-write: the model weights are in OUT.partial (saved before prediction), nothing published yet
        weights = partial / "model" / "model.safetensors"
        killer = R.Killer(R.is_train_job, weights.exists, snapshot=lambda: {"files": listing()})
        killer.start()
        result = R.materialise(defs, [MINILM], instance, partition_key="0")
        killer.join(timeout=5)
        assert killer.killed is not None and not result.success
        assert "model/model.safetensors" in killer.state["files"], killer.state
        assert "metrics.json" not in killer.state["files"]
        assert "SIGKILL" in R.failure_description(result, MINILM)
        assert_nothing_published(storage, "cross_encoder_minilm", instance, MINILM)
        assert partial.exists()  # the wreck stays aside, where nothing reads it

        # 3. re-executing succeeds: the stale OUT.partial is cleared, the contract's files appear
        result = R.materialise(defs, [MINILM], instance, partition_key="0")
        assert result.success
        assert not partial.exists()
        for name in ("oof.parquet", "oof_tta.parquet", "metrics.json", "history.jsonl", "job.json",
                     "model/model.safetensors", "model/config.yaml"):
            assert (out / name).exists(), name
        oof = pd.read_parquet(out / "oof.parquet")
        processed = pd.read_parquet(storage.data("processed_folds"))
        assert set(oof["id"]) == set(processed.loc[processed["fold"] == 0, "id"])
        assert len((out / "history.jsonl").read_text().splitlines()) == 3  # every step of the epoch
        assert instance.get_materialized_partitions(dg.AssetKey(MINILM)) == {"0"}
        assert len([r for r in job_runs("cross_encoder_minilm") if r.info.status == "FINISHED"]) == 1


def test_killed_launcher_process_leaves_no_orphan_job(home):
    """SIGKILL on the `accelerate launch` process: its `gpu_jobs.train` child must not live on as an orphan
    (it would keep the accelerator busy and publish a result after the asset has failed)."""
    profile = dataclasses.replace(SMOKE, models=(SMOKE.model("features"),))
    defs = build_definitions(profile)
    storage = ArenaStorage()
    out = storage.job_dir("stage1", "features", 0)

    killer = R.Killer(R.is_accelerate_launcher, lambda: bool(R.own_processes(R.is_train_job)),
                      snapshot=lambda: {"jobs": R.own_processes(R.is_train_job)})
    killer.start()
    with dg.DagsterInstance.get() as instance:
        result = R.materialise(defs, [FEATURES], instance, partition_key="0")
        killer.join(timeout=5)
        assert killer.killed is not None and not result.success
        description = R.failure_description(result, FEATURES)
        assert "gpu_jobs.train was killed by SIGKILL" in description
        (job,) = killer.state["jobs"]
        assert R.wait_gone(job, timeout_s=5), f"gpu_jobs.train (pid {job.pid}) outlived its launcher"
        time.sleep(3)  # longer than the features job needs to finish: had it survived, it would publish now
        assert not out.exists()
        assert instance.get_materialized_partitions(dg.AssetKey(FEATURES)) == set()


# ------------------------------------------------------------------------------------------ failure causes
def _fault_asset(mode: str, accelerate: bool):
    @dg.asset(name=f"fault_{mode}")
    def _asset(context: dg.AssetExecutionContext, launcher: JobLauncher):
        launcher.run(context, FAULT_JOBS, [mode], accelerate=accelerate)

    return _asset


@pytest.mark.parametrize("mode, accelerate, expected", [
    ("cuda_oom", False, "Cause: the GPU ran out of memory"),
    ("cuda_error", False, "Cause: a CUDA error"),
    ("host_oom", False, "Cause: the host ran out of memory"),
    ("self_kill", True, "exited with code 1: its job process was killed by SIGKILL (most often the kernel's "
                        "out-of-memory killer"),
])
def test_failure_message_names_the_cause(mode, accelerate, expected):
    result = dg.materialize([_fault_asset(mode, accelerate)], resources={"launcher": JobLauncher()},
                            raise_on_error=False)
    assert not result.success
    description = R.failure_description(result, f"fault_{mode}")
    assert expected in description, description
    assert "step 0 ok" not in description  # only the stderr tail is quoted
    if mode == "cuda_oom":
        assert "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.52 GiB" in description
    if mode == "cuda_error":
        assert "CUDA_LAUNCH_BLOCKING=1" in description


def test_signal_reported_by_a_multi_process_launcher_is_read_from_its_stderr():
    """torchrun's agent (accelerate launch with several processes) reports a killed rank on stderr."""
    tail = ["[rank1]: step 3", "  exitcode  : -9 (pid: 4242)", "  error_file: <N/A>",
            "  traceback : Signal 9 (SIGKILL) received by PID 4242"]
    assert _describe_exit(1, tail).startswith("exited with code 1: its job process was killed by SIGKILL")
    assert _describe_exit(1, ["died with <Signals.SIGTERM: 15>."]) == "exited with code 1: its job process was ended by SIGTERM"
    assert _describe_exit(1, ["RuntimeError: the tool gave exit code -1"]) == "exited with code 1"
    assert _describe_exit(-9).startswith("was killed by SIGKILL")
    assert _describe_exit(2, []) == "exited with code 2"

