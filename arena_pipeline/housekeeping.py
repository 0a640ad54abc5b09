"""Ends what a Dagster run leaves behind when it stops: job processes, open MLflow runs.

- A training/prediction/generation job runs in its own process group (so cancelling a run ends the whole
  ``accelerate`` tree). If the run worker that started it dies (killed, out of memory, the UI stopped), the
  group would go on using the accelerator: :func:`end_orphaned_jobs` kills it and marks the run failed.
- MLflow runs follow their Dagster run: a child run still RUNNING after its Dagster run ended (the worker died
  before it could close it) becomes FAILED or KILLED, and the parent run takes the Dagster run's final status
  and end time (FINISHED, FAILED, KILLED).

Both run in the ``run_housekeeping_sensor`` (every 30 s, on by default; needs the daemon, which
``arena-pipeline ui`` starts) and when ``arena-pipeline ui`` stops.
"""

from __future__ import annotations

from pathlib import Path

from dagster import DagsterInstance, DagsterRunStatus

from arena_pipeline.resources.launcher import end_orphaned_jobs
from arena_pipeline.resources.tracking import MlflowTracking

MLFLOW_STATUS = {DagsterRunStatus.SUCCESS: "FINISHED", DagsterRunStatus.FAILURE: "FAILED",
                 DagsterRunStatus.CANCELED: "KILLED"}
FINAL_TAG = "dagster_status"  # set on a parent run once it carries its Dagster run's final status


def end_orphans(instance: DagsterInstance) -> list[dict]:
    """Kill the job process groups whose run worker died or whose Dagster run is over; fail runs left open."""
    def run_is_over(run_id: str) -> bool:
        run = instance.get_run_by_id(run_id)
        return run is None or run.is_finished

    ended = end_orphaned_jobs(Path(instance.root_directory), run_is_over)
    for entry in ended:
        run = instance.get_run_by_id(entry["run_id"])
        if run is not None and not run.is_finished:
            instance.report_run_failed(run, f"the run worker (pid {entry['owner_pid']}) is gone; its job process "
                                            f"group {entry['pgid']} was killed")
    return ended


def sync_mlflow_runs(instance: DagsterInstance, tracking: MlflowTracking, max_runs: int = 500) -> list[str]:
    """Give MLflow runs of finished Dagster runs their final status; returns the MLflow run ids it changed."""
    client = tracking.client()
    exp = client.get_experiment_by_name(tracking.experiment)
    if exp is None:
        return []
    changed = []
    candidates = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=max_runs)
    candidates += [r for r in client.search_runs([exp.experiment_id], "tags.kind = 'pipeline'", max_results=max_runs,
                                                 order_by=["attributes.start_time DESC"])
                   if FINAL_TAG not in r.data.tags and r.info.status != "RUNNING"]
    for run in candidates:
        record = instance.get_run_record_by_id(run.data.tags.get("dagster_run_id", ""))
        if record is None or not record.dagster_run.is_finished:
            continue
        dagster_status = record.dagster_run.status
        status = MLFLOW_STATUS.get(dagster_status, "FAILED")
        if run.data.tags.get("kind") == "pipeline":
            end_ms = int((record.end_time or record.update_timestamp.timestamp()) * 1000)
            client.set_terminated(run.info.run_id, status, end_time=max(end_ms, run.info.start_time))
            client.set_tag(run.info.run_id, FINAL_TAG, dagster_status.value)
        else:  # a job run its worker never closed
            client.set_terminated(run.info.run_id, "KILLED" if status == "KILLED" else "FAILED")
        changed.append(run.info.run_id)
    return changed
