"""`arena-pipeline ui`: everything a user of the UIs needs, started and stopped together.

- ``dagster-webserver``: the Dagster UI;
- ``dagster-daemon run``: the run queue (without it every run launched from the UI — Materialize, the
  Launchpad, backfills — stays Queued), schedules, sensors and run monitoring;
- ``mlflow server``: the MLflow UI, which also serves the plot images shown on Dagster asset pages.

Each runs in its own process group. SIGINT (Ctrl-C) or SIGTERM stops all of them: SIGTERM to every group,
SIGKILL to what is left after ``grace_s``, then the job process groups of runs whose worker went with them
are killed and those runs marked failed (:func:`arena_pipeline.housekeeping.end_orphans`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from arena_pipeline.profile import REPO_ROOT
from arena_pipeline.resources.launcher import process_alive

GRACE_S = 30.0  # a cancelled run's worker needs up to the launcher's termination timeout (20 s) to end its job


class Stop(Exception):
    """SIGTERM or SIGINT received."""


def _raise_stop(signum, frame):
    raise Stop(signal.Signals(signum).name)


def commands(home: Path, tracking_uri: str, dagster_port: int, mlflow_port: int) -> dict[str, list[str]]:
    bin_dir = Path(sys.executable).parent
    workspace = str(REPO_ROOT / "workspace.yaml")
    return {
        "dagster-webserver": [str(bin_dir / "dagster-webserver"), "-w", workspace, "-h", "127.0.0.1",
                              "-p", str(dagster_port)],
        "dagster-daemon": [str(bin_dir / "dagster-daemon"), "run", "-w", workspace],
        "mlflow": [str(bin_dir / "mlflow"), "server", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
                   "--port", str(mlflow_port), "--workers", "1"],
    }


def stop_groups(procs: dict[str, subprocess.Popen], grace_s: float = GRACE_S) -> None:
    """SIGTERM each process group, wait up to ``grace_s`` for all of them, SIGKILL what is left."""
    for proc in procs.values():
        _killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + grace_s
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    while time.time() < deadline and any(process_alive(p.pid, group=True) for p in procs.values()):
        time.sleep(0.2)  # children of a leader that has exited (code servers, run workers, mlflow workers)
    for proc in procs.values():
        _killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def serve(home: Path, tracking_uri: str, dagster_port: int, mlflow_port: int, grace_s: float = GRACE_S) -> int:
    from dagster import DagsterInstance

    from arena_pipeline.housekeeping import end_orphans
    from arena_pipeline.resources.tracking import MlflowTracking

    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    env = {**os.environ, "DAGSTER_HOME": str(home), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "ARENA_MLFLOW_UI_URL": mlflow_url}
    tracking = MlflowTracking(tracking_uri=tracking_uri, ui_url=mlflow_url)
    experiment_url = tracking.experiment_url()  # creates the experiment (as a model-training one) if needed
    instance_yaml = (home / "dagster.yaml").read_text() if (home / "dagster.yaml").exists() else ""
    if "run_monitoring" not in instance_yaml or "nux" not in instance_yaml:
        print(f"arena-pipeline ui: {home / 'dagster.yaml'} predates run monitoring and the pop-up switch; "
              f"`cp {REPO_ROOT / 'dagster.yaml'} {home}/` to get them", file=sys.stderr, flush=True)
    with DagsterInstance.get() as instance:
        end_orphans(instance)  # left over from an earlier session that was killed
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    procs: dict[str, subprocess.Popen] = {}
    code = 0
    try:
        for name, cmd in commands(home, tracking.uri, dagster_port, mlflow_port).items():
            cwd = home if name == "mlflow" else REPO_ROOT
            procs[name] = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True)
        print(f"Dagster UI: http://127.0.0.1:{dagster_port}  (daemon running: queued runs, schedules, sensors)\n"
              f"MLflow UI:  {experiment_url}\n"
              f"Ctrl-C (or SIGTERM to pid {os.getpid()}) stops everything.", flush=True)
        while True:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    print(f"arena-pipeline ui: {name} exited with code {proc.returncode}; stopping the rest",
                          file=sys.stderr, flush=True)
                    code = 1
                    raise Stop(name)
            time.sleep(0.5)
    except Stop:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        print("arena-pipeline ui: stopping the webserver, the daemon and MLflow", flush=True)
        stop_groups(procs, grace_s)
        with DagsterInstance.get() as instance:
            for entry in end_orphans(instance):
                print(f"arena-pipeline ui: killed job process group {entry['pgid']} of run {entry['run_id']}",
                      flush=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
