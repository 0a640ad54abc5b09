"""`arena-pipeline ui` runs the webserver, the daemon and MLflow, and SIGTERM / SIGINT stop every process."""

import signal
import time
import urllib.request

import psutil
import pytest

from arena_pipeline_tests.ui.support import DAEMONS, UiProcess, daemon_status, graphql

pytestmark = pytest.mark.slow


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_runs_daemon_and_stops_every_process_on_signal(tmp_path, sig):
    ui = UiProcess(tmp_path / "home", tmp_path / "ui.log")
    try:
        ui.wait_ready()
        status = daemon_status(ui.dagster_port)
        assert DAEMONS <= {name for name, healthy in status.items() if healthy}, status
        assert graphql(ui.dagster_port, "{ shouldShowNux }")["shouldShowNux"] is False  # no community pop-up
        tree = _tree(ui.proc.pid)
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        assert "dagster-webserver" in names and "dagster-daemon" in names and "mlflow" in names
        assert "#/experiments/" in ui.output() and "/runs" in ui.output()  # the MLflow link opens the runs table
        start = time.time()
        code = ui.stop(sig)
        stop_s = time.time() - start
    except BaseException:
        print(ui.output()[-5000:])
        raise
    assert code == 0, ui.output()[-3000:]
    deadline = time.time() + 10
    while time.time() < deadline and not all(_gone(p) for p in tree):
        time.sleep(0.2)
    left = [(p.pid, " ".join(p.cmdline())[:120]) for p in tree if not _gone(p)]
    assert not left, left
    for port in (ui.dagster_port, ui.mlflow_port):
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3)
    print(f"{signal.Signals(sig).name}: {len(tree)} processes stopped in {stop_s:.1f} s")
