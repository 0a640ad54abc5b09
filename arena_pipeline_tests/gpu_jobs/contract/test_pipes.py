"""gpu_jobs.contract.pipes: real Dagster Pipes on the main process when launched by Dagster, a no-op otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dagster_pipes import encode_env_var

from gpu_jobs.contract import pipes as P


@pytest.fixture(autouse=True)
def fresh_pipes_singleton(monkeypatch):
    """A job opens Pipes once per process; these tests open it several times in one."""
    from dagster_pipes import PipesContext

    monkeypatch.setattr(PipesContext, "_instance", None)


def pipes_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment Dagster's subprocess client gives a job: a context file and a messages file."""
    context = {"asset_keys": ["oof"], "code_version_by_asset_key": None, "provenance_by_asset_key": None,
               "partition_key": "0", "partition_key_range": None, "partition_time_window": None,
               "run_id": "test-run", "job_name": None, "retry_number": 0, "extras": {}}
    (tmp_path / "context.json").write_text(json.dumps(context))
    messages = tmp_path / "messages.jsonl"
    env = {"DAGSTER_PIPES_CONTEXT": encode_env_var({"path": str(tmp_path / "context.json")}),
           "DAGSTER_PIPES_MESSAGES": encode_env_var({"path": str(messages)})}
    return env, messages


def read_messages(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_without_dagster_it_is_a_no_op_with_the_same_methods(monkeypatch):
    monkeypatch.delenv("DAGSTER_PIPES_CONTEXT", raising=False)
    with P.open_pipes() as pipes:
        assert isinstance(pipes, P.NoOpPipes)
        pipes.log.info("hello")
        pipes.report_asset_materialization(metadata={"val_log_loss": 0.9})
    assert pipes.materializations == [{"metadata": {"val_log_loss": 0.9}, "data_version": None, "asset_key": None}]


def test_main_process_under_dagster_reports_through_real_pipes(tmp_path, monkeypatch):
    env, messages = pipes_env(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with P.open_pipes() as pipes:
        assert not isinstance(pipes, P.NoOpPipes)
        assert pipes.partition_key == "0"
        pipes.log.info("training")
        pipes.report_asset_materialization(metadata=P.clean_metadata({"val_log_loss": 0.93, "n_val": 5,
                                                                      "bad": float("nan")}))
    methods = [m["method"] for m in read_messages(messages)]
    assert methods[0] == "opened" and methods[-1] == "closed"
    assert methods.count("report_asset_materialization") == 1 and "log" in methods
    mat = next(m for m in read_messages(messages) if m["method"] == "report_asset_materialization")
    assert mat["params"]["metadata"]["val_log_loss"]["raw_value"] == 0.93
    assert mat["params"]["metadata"]["bad"]["raw_value"] is None


def test_other_ranks_never_open_pipes(tmp_path, monkeypatch):
    env, messages = pipes_env(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(P, "is_main_process", lambda: False)
    with P.open_pipes() as pipes:
        assert isinstance(pipes, P.NoOpPipes)
        pipes.report_asset_materialization(metadata={"x": 1})
    assert not messages.exists()


def test_main_process_falls_back_on_rank_without_accelerate(monkeypatch):
    import accelerate

    def broken():
        raise RuntimeError("no accelerate state")

    monkeypatch.setattr(accelerate, "PartialState", broken)
    monkeypatch.setenv("RANK", "1")
    assert P.is_main_process() is False
    monkeypatch.setenv("RANK", "0")
    assert P.is_main_process() is True


def test_errors_are_logged_through_pipes_and_reraised(tmp_path, monkeypatch):
    env, messages = pipes_env(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    from gpu_jobs.train import main

    configs = Path(__file__).resolve().parents[3] / "gpu_jobs" / "configs"
    with pytest.raises(FileNotFoundError):
        main(["--config", str(configs / "cross_encoder_minilm.yaml"), "--fold", "0",
              "--data", str(tmp_path / "missing.parquet"), "--output-dir", str(tmp_path / "out")])
    logged = [m["params"]["message"] for m in read_messages(messages) if m["method"] == "log"]
    assert any("gpu_jobs.train failed" in line and "missing.parquet" in line for line in logged)
    closed = [m for m in read_messages(messages) if m["method"] == "closed"]
    assert closed and closed[0]["params"]["exception"] is not None
