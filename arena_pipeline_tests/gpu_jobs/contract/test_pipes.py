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


def test_quiet_stand_in_drops_info_but_shows_warnings():
    """Other ranks and gpu_jobs.generate (which prints its own log) get a stand-in that does not echo info."""
    code = ("from gpu_jobs.contract.pipes import NoOpPipes\n"
            "NoOpPipes(quiet=True).log.info('quiet info')\n"
            "NoOpPipes(quiet=True).log.warning('quiet warning')\n"
            "NoOpPipes().log.info('loud info')\n")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[3], capture_output=True,
                         text=True, check=True)
    assert "quiet info" not in out.stderr and "quiet warning" in out.stderr and "loud info" in out.stderr


def test_without_dagster_pipes_installed_the_stand_in_is_used_with_a_warning(tmp_path, monkeypatch, capsys):
    import builtins

    env, messages = pipes_env(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    real_import = builtins.__import__

    def no_dagster_pipes(name, *args, **kwargs):
        if name == "dagster_pipes":
            raise ImportError("No module named 'dagster_pipes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dagster_pipes)
    with P.open_pipes(quiet=True) as pipes:
        assert isinstance(pipes, P.NoOpPipes)
        pipes.report_asset_materialization(metadata={"n_prompts": 3})
    assert "dagster-pipes is not installed" in capsys.readouterr().err
    assert not messages.exists()
