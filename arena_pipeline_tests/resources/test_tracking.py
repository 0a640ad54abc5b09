"""The MLflow resource: one run per (stage, model, fold), nested under a parent run per Dagster run."""

import dagster as dg
import pytest

from arena_pipeline.resources.tracking import MlflowTracking, flatten


def test_flatten_config():
    assert flatten("", {"training": {"lr": 1e-4, "mods": ["q", "k"]}, "seed": 1}, {}) == {
        "training.lr": "0.0001", "training.mods": '["q", "k"]', "seed": "1"}


def test_job_runs_nest_under_one_parent_and_carry_tags(tmp_path):
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["0", "1"]),
              backfill_policy=dg.BackfillPolicy.single_run())
    def oof(context: dg.AssetExecutionContext, mlflow: MlflowTracking) -> None:
        for fold in (0, 1):
            history = [{"step": s, "loss": 1.1 - 0.1 * s, "lr": 1e-4} for s in range(3)]
            mlflow.log_job(context, stage="stage1", model="features", fold=fold,
                           params={"training": {"lr": 1e-4}}, metrics={"val_log_loss": 1.0 - 0.1 * fold},
                           history=history, tags={"data_version": "abc"})

    result = dg.materialize([oof], resources={"mlflow": tracking},
                            tags={"dagster/asset_partition_range_start": "0", "dagster/asset_partition_range_end": "1"})
    assert result.success
    client = tracking.client()
    exp = client.get_experiment_by_name("arena-pipeline")
    jobs = client.search_runs([exp.experiment_id], "tags.kind = 'job'")
    parents = client.search_runs([exp.experiment_id], "tags.kind = 'pipeline'")
    assert len(jobs) == 2 and len(parents) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parents[0].info.run_id}
    run = sorted(jobs, key=lambda r: r.data.tags["fold"])[1]
    assert run.data.tags["dagster_run_id"] == result.run_id
    assert run.data.tags["stage"] == "stage1" and run.data.tags["data_version"] == "abc"
    assert run.data.params["training.lr"] == "0.0001"
    assert run.data.metrics["val_log_loss"] == pytest.approx(0.9)
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == [0, 1, 2]
    assert losses[-1].value == pytest.approx(0.9)


def test_mlflow_key_sanitises_member_names():
    from arena_pipeline.resources.tracking import mlflow_key

    assert mlflow_key("weights.stage1/features+tta") == "weights.stage1/features_tta"


def _job_runs(tracking, client=None):
    client = client or tracking.client()
    exp = client.get_experiment_by_name("arena-pipeline")
    return client, client.search_runs([exp.experiment_id], "tags.kind = 'job'") if exp else []


def test_job_run_is_live_while_the_job_runs_and_ends_with_it(tmp_path):
    """RUNNING with per-step metrics (from Pipes messages) while the job runs; FINISHED with its real duration;
    config values are params; the parent is named after what ran and ends with the job."""
    import threading
    import time

    from arena_pipeline.resources.launcher import JobLauncher

    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    go = tmp_path / "go"
    seen: dict = {}
    # the store (and its schema migration) is made here: alembic must not run in two threads at once, and
    # dg.materialize's ephemeral instance runs it too
    watcher_client = tracking.client()
    tracking.experiment_id(watcher_client)

    def watch():
        deadline = time.time() + 120
        while time.time() < deadline:
            client, runs = _job_runs(tracking, watcher_client)
            if runs and len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 2:
                seen["status"] = client.get_run(runs[0].info.run_id).info.status
                parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
                seen["parent_status"], seen["parent_name"] = parent.info.status, parent.info.run_name
                break
            time.sleep(0.5)
        time.sleep(1.0)  # the job keeps running for a while after its steps
        go.touch()

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["0"]))
    def oof(context: dg.AssetExecutionContext, mlflow: MlflowTracking, launcher: JobLauncher):
        with mlflow.job_run(context, stage="stage1", model="fake", fold=0, params={"config_file": "x.yaml"}) as run:
            result = launcher.run(context, "arena_pipeline_tests.resources.fake_jobs", ["steps", str(go)],
                                  accelerate=False, on_message=run.on_message)
            run.log_result({**result.metadata, "fold": 0, "n_steps": 2, "num_processes": 1, "resumed_from_step": 0},
                           history=[{"step": 1, "loss": 1.0, "lr": 1e-4}, {"step": 2, "loss": 0.5, "lr": 1e-4}])
        return dg.MaterializeResult(metadata=result.metadata)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = dg.materialize([oof], resources={"mlflow": tracking, "launcher": JobLauncher()}, partition_key="0")
    watcher.join(timeout=5)
    assert result.success
    assert seen == {"status": "RUNNING", "parent_status": "RUNNING", "parent_name": seen["parent_name"]}
    assert seen["parent_name"].startswith("oof[0] ")  # what ran and its partition, not __ASSET_JOB
    client, (run,) = _job_runs(tracking)
    info = client.get_run(run.info.run_id)
    assert info.info.status == "FINISHED"
    assert (info.info.end_time - info.info.start_time) / 1000 >= 1.0  # the job's duration, not the logging time
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]  # streamed once
    assert info.data.metrics["val_log_loss"] == pytest.approx(0.9)
    for key in ("fold", "n_steps", "num_processes", "resumed_from_step"):
        assert key not in info.data.metrics and key in info.data.params
    assert info.data.params["config_file"] == "x.yaml"
    assert client.get_run(info.data.tags["mlflow.parentRunId"]).info.status == "FINISHED"
    exp = client.get_experiment_by_name("arena-pipeline")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow opens on the runs table


@pytest.mark.parametrize("error,status", [("fail", "FAILED"), ("cancel", "KILLED")])
def test_job_run_ends_failed_or_killed(tmp_path, error, status):

    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    @dg.asset
    def oof(context: dg.AssetExecutionContext, mlflow: MlflowTracking) -> None:
        with mlflow.job_run(context, stage="stage1", model="fake", fold=0):
            raise dg.DagsterExecutionInterruptedError() if error == "cancel" else dg.Failure("job exited with code 1")

    result = dg.materialize([oof], resources={"mlflow": tracking}, raise_on_error=False)
    assert not result.success
    client, (run,) = _job_runs(tracking)
    assert run.info.status == status
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == status
