"""What a run leaves behind when its worker dies: job process groups are killed, MLflow runs get a final status."""

import json
import os
import signal
import subprocess
import sys
import time

import dagster as dg

from arena_pipeline.housekeeping import end_orphans, sync_mlflow_runs
from arena_pipeline.resources.launcher import end_orphaned_jobs, jobs_dir
from arena_pipeline.resources.tracking import MlflowTracking


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _register(root, pgid: int, run_id: str, owner: int) -> None:
    jobs_dir(root).mkdir(parents=True, exist_ok=True)
    (jobs_dir(root) / f"{pgid}.json").write_text(json.dumps({"pgid": pgid, "run_id": run_id, "owner_pid": owner,
                                                             "command": ["sleep"], "started": time.time()}))


def test_job_group_of_a_dead_run_worker_is_killed(tmp_path):
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    try:
        _register(tmp_path, job.pid, "run-a", owner=_dead_pid())
        _register(tmp_path, alive.pid, "run-b", owner=os.getpid())  # its worker (this process) is alive
        ended = end_orphaned_jobs(tmp_path)
        assert [e["pgid"] for e in ended] == [job.pid] and ended[0]["killed"]
        assert job.wait(timeout=10) == -signal.SIGKILL
        assert alive.poll() is None and (jobs_dir(tmp_path) / f"{alive.pid}.json").exists()
        assert [e["pgid"] for e in end_orphaned_jobs(tmp_path, run_is_over=lambda run_id: run_id == "run-b")] \
            == [alive.pid]  # a job whose Dagster run is over goes too
        assert alive.wait(timeout=10) == -signal.SIGKILL
    finally:
        for proc in (job, alive):
            if proc.poll() is None:
                proc.kill()


def test_orphan_fails_its_run_and_mlflow_runs_follow_the_dagster_run(tmp_path):
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    @dg.asset
    def broken(context: dg.AssetExecutionContext, mlflow: MlflowTracking):
        mlflow.parent_run(context)  # opened, then the step fails before any job closes it
        raise dg.Failure("boom")

    @dg.asset
    def fine(context: dg.AssetExecutionContext, mlflow: MlflowTracking):
        with mlflow.job_run(context, stage="stage1", model="m", fold=0):
            pass
        return dg.MaterializeResult()

    with dg.instance_for_test() as instance:
        failed = dg.materialize([broken], resources={"mlflow": tracking}, instance=instance, raise_on_error=False)
        ok = dg.materialize([fine], resources={"mlflow": tracking}, instance=instance)
        client = tracking.client()
        exp = client.get_experiment_by_name("arena-pipeline").experiment_id
        parents = {r.data.tags["dagster_run_id"]: r for r in client.search_runs([exp], "tags.kind = 'pipeline'")}
        assert parents[failed.run_id].info.status == "RUNNING"
        assert parents[ok.run_id].info.status == "FINISHED"  # ended with its last job
        assert len(sync_mlflow_runs(instance, tracking)) == 2
        parents = {r.data.tags["dagster_run_id"]: r for r in client.search_runs([exp], "tags.kind = 'pipeline'")}
        assert parents[failed.run_id].info.status == "FAILED"
        assert parents[failed.run_id].data.tags["dagster_status"] == "FAILURE"
        assert parents[ok.run_id].data.tags["dagster_status"] == "SUCCESS"
        assert sync_mlflow_runs(instance, tracking) == []  # once only

        # a run still STARTED whose worker is gone: its job is killed and the run marked failed
        run = instance.create_run_for_job(dg.GraphDefinition("g").to_job(), status=dg.DagsterRunStatus.STARTED)
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
        job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
        try:
            _register(instance.root_directory, job.pid, run.run_id, owner=_dead_pid())
            assert [e["run_id"] for e in end_orphans(instance)] == [run.run_id]
            assert job.wait(timeout=10) == -signal.SIGKILL
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
        finally:
            if job.poll() is None:
                job.kill()
