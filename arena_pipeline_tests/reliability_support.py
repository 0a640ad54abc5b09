"""Helpers shared by the reliability tests (faults, concurrency, determinism) and the overhead benchmark."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import psutil

from arena_pipeline.profile import REPO_ROOT

INPUT_ASSETS = ("raw_labelled", "raw_external", "processed_folds")


def new_home(path: Path) -> Path:
    """A state folder with the repository's dagster.yaml (sqlite storage, `gpu` pool limit 1)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "dagster.yaml", path / "dagster.yaml")
    return path


@contextlib.contextmanager
def dagster_home(path: Path) -> Iterator[Path]:
    """Point DAGSTER_HOME (instance, storage, MLflow) at ``path`` for the duration."""
    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = old


def asset_def(defs: dg.Definitions, name: str) -> dg.AssetsDefinition:
    for item in defs.assets or []:
        if isinstance(item, dg.AssetsDefinition) and dg.AssetKey(name) in item.keys:
            return item
    raise KeyError(name)


def materialise(defs: dg.Definitions, names, instance: dg.DagsterInstance, **kwargs) -> dg.ExecuteInProcessResult:
    """``dg.materialize`` of the named assets of ``defs`` with its resources (in process); the tables they read
    (their inputs) are given as external assets, which the IO manager hands over as paths."""
    kwargs.setdefault("raise_on_error", False)
    assets = [asset_def(defs, n) for n in names]
    reads = {key for a in assets for key in a.keys_by_input_name.values()} - {key for a in assets for key in a.keys}
    return dg.materialize([*assets, *(dg.AssetSpec(key) for key in sorted(reads))], instance=instance,
                          resources=defs.resources, **kwargs)


def materialise_inputs(defs: dg.Definitions, instance: dg.DagsterInstance) -> None:
    """raw_labelled, raw_external and processed_folds: what a training asset reads."""
    result = materialise(defs, INPUT_ASSETS, instance)
    assert result.success, "could not build processed_folds"


def failure_description(result: dg.ExecuteInProcessResult, node: str) -> str:
    failure = result.failure_data_for_node(node)
    assert failure is not None, f"{node} did not fail"
    if failure.user_failure_data is not None and failure.user_failure_data.description:
        return failure.user_failure_data.description
    return failure.error.to_string()


# ------------------------------------------------------------------------------------------ processes
def own_processes(match: Callable[[list[str]], bool]) -> list[psutil.Process]:
    """Descendants of this process whose command line matches (never another user's processes)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if match(proc.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return found


def is_train_job(cmdline: list[str]) -> bool:
    """The `gpu_jobs.train` process itself (not the `accelerate launch` process above it)."""
    return "gpu_jobs.train" in cmdline and "accelerate.commands.launch" not in cmdline


def is_accelerate_launcher(cmdline: list[str]) -> bool:
    return "accelerate.commands.launch" in cmdline and "gpu_jobs.train" in cmdline


class Killer(threading.Thread):
    """Sends ``sig`` to the first own process matching ``match`` once ``when()`` holds; records the moment.

    ``snapshot()`` is called right before the kill (what the job had written by then).
    """

    def __init__(self, match: Callable[[list[str]], bool], when: Callable[[], bool],
                 snapshot: Callable[[], dict] = dict, sig: int = signal.SIGKILL, timeout_s: float = 600,
                 poll_s: float = 0.02):
        super().__init__(daemon=True)
        self.match, self.when, self.snapshot, self.sig = match, when, snapshot, sig
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.killed: psutil.Process | None = None
        self.state: dict = {}
        self.killed_at: float | None = None

    def run(self) -> None:
        deadline = time.time() + self.timeout_s
        target: psutil.Process | None = None
        while time.time() < deadline:
            if target is None or not target.is_running():
                hits = own_processes(self.match)
                target = hits[0] if hits else None
            if target is not None and self.when():
                self.state = self.snapshot()
                try:
                    os.kill(target.pid, self.sig)
                except ProcessLookupError:
                    target = None
                    continue
                self.killed, self.killed_at = target, time.time()
                return
            time.sleep(self.poll_s)


def wait_gone(proc: psutil.Process, timeout_s: float = 15) -> bool:
    """True once ``proc`` has exited (a zombie counts as gone)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False
