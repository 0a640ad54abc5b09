"""Shared fixtures: every test gets its own state folder, so nothing touches the developer's instance."""

import os
import shutil

import dagster as dg
import pytest

from arena_pipeline.profile import REPO_ROOT, SMOKE
from arena_pipeline.resources.storage import ArenaStorage


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("dagster_home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("ARENA_EMBEDDING_CACHE", str(home / "embeddings"))  # sentence vectors stay per test
    monkeypatch.delenv("ARENA_STORAGE_HOME", raising=False)
    monkeypatch.delenv("ARENA_MLFLOW_URI", raising=False)
    yield home


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Tests that run a job's main() in this process each build an Accelerator; accelerate keeps one state per
    process and refuses a second with another precision, so every test starts and ends without one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("smoke_home")
    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        from arena_pipeline.definitions import build_definitions
        from arena_pipeline.partitions import fold_range_tags

        defs = build_definitions(SMOKE)
        job = defs.resolve_job_def("full_pipeline_job")
        shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")  # a real sqlite instance the UI can read
        with dg.DagsterInstance.get() as instance:
            result = job.execute_in_process(instance=instance, tags=fold_range_tags(SMOKE), raise_on_error=False)
            materialised = {
                key.to_user_string()
                for key in defs.resolve_asset_graph().get_all_asset_keys()
                if instance.get_latest_materialization_event(key) is not None
            }
            checks = [e.event_specific_data for e in result.all_events
                      if e.event_type_value == "ASSET_CHECK_EVALUATION"]
            yield {"result": result, "defs": defs, "storage": ArenaStorage(home=str(home / "arena")), "home": home,
                   "materialised": materialised, "checks": checks}
    finally:
        if old is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = old


