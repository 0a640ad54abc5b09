"""The new-unlabelled-files sensor, evaluated on real files in a temp folder."""

import json

import dagster as dg
import pandas as pd

from arena_pipeline.profile import SHIPPED
from arena_pipeline.resources.storage import ArenaStorage
from arena_pipeline.sensors import build_sensors


@dg.op
def _noop():
    pass


@dg.job(name="pseudo_labels_job")
def _pseudo_job():
    _noop()


def _sensor():
    return build_sensors(_pseudo_job)[0]


def test_sensor_requests_a_run_for_new_files_only(tmp_path):
    storage = ArenaStorage(home=str(tmp_path))
    sensor = _sensor()
    with dg.build_sensor_context(resources={"storage": storage}) as ctx:
        assert isinstance(sensor(ctx), dg.SkipReason)  # empty folder

    rows = pd.read_parquet(SHIPPED / "arena_bench_unlabelled.parquet").head(5)
    rows.to_parquet(storage.incoming_dir / "batch1.parquet")
    (storage.incoming_dir / "notes.txt").write_text("ignored")
    with dg.build_sensor_context(resources={"storage": storage}) as ctx:
        request = sensor(ctx)
        cursor = ctx.cursor
    assert isinstance(request, dg.RunRequest)
    assert "batch1.parquet" in request.run_key and request.tags["arena/new_files"] == "batch1.parquet"
    assert set(json.loads(cursor)) == {"batch1.parquet"}

    with dg.build_sensor_context(resources={"storage": storage}, cursor=cursor) as ctx:
        assert isinstance(sensor(ctx), dg.SkipReason)  # nothing new since the cursor

    rows.to_csv(storage.incoming_dir / "batch2.csv", index=False)
    with dg.build_sensor_context(resources={"storage": storage}, cursor=cursor) as ctx:
        request = sensor(ctx)
    assert isinstance(request, dg.RunRequest) and request.tags["arena/new_files"] == "batch2.csv"
