"""Sensors: rebuild pseudo labels when new unlabelled files land in the incoming folder; clean up after runs."""


import json

import dagster as dg

from arena_pipeline.resources.storage import ArenaStorage
from arena_pipeline.resources.tracking import MlflowTracking

SUFFIXES = {".parquet", ".csv", ".jsonl"}


def incoming_state(storage: ArenaStorage) -> dict[str, float]:
    """File name -> modification time of every candidate file in the watched folder."""
    return {p.name: p.stat().st_mtime for p in sorted(storage.incoming_dir.iterdir())
            if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith(".")}


def build_sensors(pseudo_job) -> list[dg.SensorDefinition]:
    @dg.sensor(job=pseudo_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
               description="Starts the pseudo-label rebuild when new or changed files appear in <state>/arena/incoming.")
    def new_unlabelled_files_sensor(context: dg.SensorEvaluationContext, storage: ArenaStorage):
        seen = json.loads(context.cursor) if context.cursor else {}
        now = incoming_state(storage)
        changed = sorted(name for name, mtime in now.items() if seen.get(name) != mtime)
        if not changed:
            return dg.SkipReason(f"no new files in {storage.incoming_dir}")
        context.update_cursor(json.dumps(now))
        return dg.RunRequest(run_key=f"incoming-{max(now.values())}-{'|'.join(changed)}",
                             tags={"arena/new_files": ",".join(changed)[:200]})

    return [new_unlabelled_files_sensor, run_housekeeping_sensor]


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Ends job process groups whose run worker died (and fails that run), and gives MLflow runs "
                       "of finished Dagster runs their final status (arena_pipeline/housekeeping.py).")
def run_housekeeping_sensor(context: dg.SensorEvaluationContext, mlflow: MlflowTracking):
    from arena_pipeline.housekeeping import end_orphans, sync_mlflow_runs

    ended = end_orphans(context.instance)
    synced = sync_mlflow_runs(context.instance, mlflow)
    return dg.SkipReason(f"ended {len(ended)} orphaned job(s), closed {len(synced)} MLflow run(s)")
