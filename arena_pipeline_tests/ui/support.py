"""Start `arena-pipeline ui` as a user would (a subprocess on free ports, its own state folder) and talk to it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from arena_pipeline.profile import REPO_ROOT

DAEMONS = {"SCHEDULER", "SENSOR", "QUEUED_RUN_COORDINATOR", "MONITORING"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 180, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"arena-pipeline ui exited with {proc.returncode} while waiting for {url}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql",
                                     data=json.dumps({"query": query, "variables": variables or {}}).encode(),
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=60).read())["data"]


def daemon_status(port: int) -> dict[str, bool]:
    data = graphql(port, "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy } } } }")
    return {d["daemonType"]: bool(d["healthy"]) for d in data["instance"]["daemonHealth"]["allDaemonStatuses"]}


class UiProcess:
    """`python -m arena_pipeline.cli ui` on free ports with DAGSTER_HOME=home (smoke profile)."""

    def __init__(self, home: Path, log: Path, extra_env: dict | None = None):
        self.home, self.log_path = home, log
        self.dagster_port, self.mlflow_port = free_port(), free_port()
        home.mkdir(parents=True, exist_ok=True)
        if not (home / "dagster.yaml").exists():
            shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
        env = {**os.environ, "DAGSTER_HOME": str(home), "ARENA_PROFILE": "smoke",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])),
               **(extra_env or {})}
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "arena_pipeline.cli", "ui", "--dagster-port", str(self.dagster_port),
             "--mlflow-port", str(self.mlflow_port)],
            cwd=REPO_ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def dagster_url(self) -> str:
        return f"http://127.0.0.1:{self.dagster_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def wait_ready(self, timeout: float = 240) -> None:
        wait_http(f"{self.dagster_url}/server_info", timeout, self.proc)
        wait_http(f"{self.mlflow_url}/health", timeout, self.proc)
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = daemon_status(self.dagster_port)
            if DAEMONS <= {k for k, v in status.items() if v}:
                return
            time.sleep(2)
        raise TimeoutError(f"daemons not healthy: {status}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:  # never leave a test's servers behind
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")
