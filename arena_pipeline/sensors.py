"""A sensor that rebuilds pseudo labels when new unlabelled files land in the incoming folder."""


import json

import dagster as dg

from arena_pipeline.resources.storage import ArenaStorage

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

    return [new_unlabelled_files_sensor]
