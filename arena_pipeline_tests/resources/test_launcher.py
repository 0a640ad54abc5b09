"""The local Pipes launcher: metadata back from the child, failures with the stderr tail, cancellation."""


import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest

from arena_pipeline.resources.launcher import JobLauncher

FAKE = "arena_pipeline_tests.resources.fake_jobs"


def _asset(mode: str, accelerate: bool = False, extra: list[str] = ()):
    @dg.asset(name=f"fake_{mode}")
    def _fake(context: dg.AssetExecutionContext, launcher: JobLauncher):
        result = launcher.run(context, FAKE, [mode, *extra], accelerate=accelerate)
        return dg.MaterializeResult(metadata={**result.metadata, "wall_s": result.wall_s})

    return _fake


def test_pipes_metadata_and_logs_come_back():
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([_asset("report")], resources={"launcher": JobLauncher()}, instance=instance)
    assert result.success
    mat = result.asset_materializations_for_node("fake_report")[0]
    assert mat.metadata["val_log_loss"].value == pytest.approx(0.95)
    assert mat.metadata["n_val"].value == 12
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert "progress line on stdout" in messages  # the child's stdout streams into the run log
    assert "hello from the job" in messages  # and so do its Pipes log calls


def test_pipes_through_accelerate_launch():
    result = dg.materialize([_asset("report", accelerate=True)], resources={"launcher": JobLauncher()})
    assert result.success
    assert result.asset_materializations_for_node("fake_report")[0].metadata["n_val"].value == 12


def test_failed_child_fails_asset_with_stderr_tail():
    result = dg.materialize([_asset("fail")], resources={"launcher": JobLauncher()}, raise_on_error=False)
    assert not result.success
    failure = result.failure_data_for_node("fake_fail")
    text = failure.error.message + "".join(failure.error.cause.message if failure.error.cause else "")
    description = str(failure.user_failure_data.description if failure.user_failure_data else text)
    assert "exited with code 3" in description
    assert "ValueError: the real cause is here" in description
    assert "noise line 0" not in description  # only the tail


def test_killed_child_names_the_likely_cause():
    result = dg.materialize([_asset("oom")], resources={"launcher": JobLauncher()}, raise_on_error=False)
    description = result.failure_data_for_node("fake_oom").user_failure_data.description
    assert "SIGKILL" in description and "out-of-memory" in description


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") == -1
    except FileNotFoundError:
        return False


def test_cancelling_the_run_ends_the_whole_process_tree(tmp_path):
    pid_file = tmp_path / "pids.txt"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import dagster as dg
        from arena_pipeline.resources.launcher import JobLauncher
        from arena_pipeline_tests.resources.test_launcher import _asset
        dg.materialize([_asset("tree", accelerate=True, extra=[{str(pid_file)!r}])],
                       resources={{"launcher": JobLauncher(termination_timeout_s=5)}}, raise_on_error=False)
    """))
    runner = subprocess.Popen([sys.executable, str(script)], cwd=Path(__file__).resolve().parents[2])
    deadline = time.time() + 120
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert pid_file.exists(), "job never started"
    pids = [int(p) for p in pid_file.read_text().split()]
    assert all(_alive(p) for p in pids)
    runner.send_signal(signal.SIGINT)  # what `dagster` does to a run process on cancel
    runner.wait(timeout=60)
    time.sleep(1)
    assert not any(_alive(p) for p in pids), f"processes left behind: {[p for p in pids if _alive(p)]}"
