"""Launch `gpu_jobs` programs as separate processes through Dagster Pipes.

The local launcher runs ``<python> -m accelerate.commands.launch --config_file ... -m gpu_jobs.<program>``
(or plain ``<python> -m ...`` for programs that need no accelerate) in its own process group, streams the
child's stdout/stderr into the Dagster run log while it runs, ends the whole process tree when the run is
cancelled, and fails the asset with the tail of the child's stderr when it exits non-zero. Each job
program can run in its own Python environment (``environments``: name -> python executable), the local
counterpart of a job image on a cluster.

Jobs of an asset in a Dagster pool (``pool="gpu"``) also hold one of the pool's slots *on this machine* while
they run: a file lock under ``<instance root>/locks`` (the pool's limit = number of lock files). Dagster's own
slot claim can let two steps in at once when both claim at the same instant against sqlite storage (its
select-then-update claim is not atomic across processes); the lock keeps the limit on the processes that use
the accelerator, and the kernel frees it when the holder dies.

While a job runs, its process group is registered in ``<instance root>/jobs/<pgid>.json`` (with the Dagster run
and the pid of the run worker that started it); :func:`end_orphaned_jobs` ends the groups whose run worker is
gone (``arena-pipeline ui`` on shutdown, and the ``run_housekeeping_sensor``). ``on_message`` receives the job's
Pipes custom messages (per-step metrics) while it runs.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import dagster as dg

from arena_pipeline.profile import ACCELERATE_DIR, REPO_ROOT
from arena_pipeline.resources.launching import JobResult, Launcher, MessageRelay, cause_hint, job_result

STDERR_TAIL_LINES = 40


# `accelerate launch` turns a job process's death by a signal into its own exit code 1 and says so on stderr:
# the single-process launcher raises CalledProcessError ("died with <Signals.SIGKILL: 9>"), torchrun's
# elastic agent prints "exitcode : -9" / "Signal 9 (SIGKILL) received by PID".
_WRAPPED_SIGNAL = re.compile(r"died with <Signals\.SIG\w+: (\d+)>|Signal (\d+) \(SIG\w+\) received by PID|exitcode\s*:\s*-(\d+)")


def _wrapped_signal(tail: list[str]) -> int | None:
    """The signal that ended a job process under a launcher process (from the launcher's stderr), if any."""
    for line in reversed(tail):
        match = _WRAPPED_SIGNAL.search(line)
        if match:
            number = int(next(g for g in match.groups() if g))
            try:
                signal.Signals(number)
            except ValueError:
                continue
            return number
    return None


def _describe_signal(number: int) -> str:
    sig = signal.Signals(number).name
    if number == signal.SIGKILL:
        return f"was killed by {sig} (most often the kernel's out-of-memory killer; lower batch_size or max_length)"
    return f"was ended by {sig}"


def _describe_exit(code: int, tail: list[str] = ()) -> str:
    if code < 0:
        return _describe_signal(-code)
    wrapped = _wrapped_signal(list(tail)) if code > 0 else None
    if wrapped is not None:
        return f"exited with code {code}: its job process {_describe_signal(wrapped)}"
    return f"exited with code {code}"


class JobLauncher(Launcher):
    """Runs job programs as local subprocesses under Dagster Pipes."""

    accelerate_config: str = str(ACCELERATE_DIR / "cpu_single.yaml")
    environments: dict[str, str] = {}
    extra_env: dict[str, str] = {}
    termination_timeout_s: float = 20.0
    machine_pool_lock: bool = True  # hold a machine-local slot of the asset's pool while the job runs
    lock_poll_s: float = 0.5

    def python_for(self, environment: str) -> str:
        if environment == "default":
            return self.environments.get("default", sys.executable)
        if environment not in self.environments:
            raise dg.Failure(f"launcher has no environment '{environment}' (configured: {sorted(self.environments)})")
        return self.environments[environment]

    def has_environment(self, environment: str) -> bool:
        """``default`` always (this interpreter); another environment when its python exists."""
        return environment == "default" or (environment in self.environments
                                            and Path(self.environments[environment]).exists())

    def config_file(self, accelerate_config: str | None = None) -> str:
        """The accelerate config a job uses: a member's own (a file name under gpu_jobs/accelerate_configs, or a
        path), else the launcher's."""
        if not accelerate_config:
            return self.accelerate_config
        path = Path(accelerate_config)
        return str(path if path.is_absolute() or path.parent != Path(".") else ACCELERATE_DIR / path)

    def command(self, module: str, args: list[str], *, accelerate: bool, environment: str = "default",
                accelerate_config: str | None = None) -> list[str]:
        python = self.python_for(environment)
        if accelerate:
            return [python, "-m", "accelerate.commands.launch", "--config_file", self.config_file(accelerate_config),
                    "-m", module, *args]
        return [python, "-m", module, *args]

    def run(
        self,
        context: dg.AssetExecutionContext,
        module: str,
        args: list,
        *,
        accelerate: bool = True,
        environment: str = "default",
        extras: dict | None = None,
        on_message: Callable[[Any], None] | None = None,
        accelerate_config: str | None = None,
    ) -> JobResult:
        """Run one job program; ``on_message`` gets each Pipes custom message (e.g. a training step's metrics)
        within about a second of the job sending it; ``accelerate_config``: a member's own config (ModelSpec)."""
        slot = local_pool_slot(context, self.lock_poll_s) if self.machine_pool_lock else contextlib.nullcontext()
        with slot:
            return self._run(context, module, args, accelerate=accelerate, environment=environment, extras=extras,
                             on_message=on_message, accelerate_config=accelerate_config)

    def _run(self, context, module: str, args: list[str], *, accelerate: bool, environment: str,
             extras: dict | None, on_message: Callable[[Any], None] | None,
             accelerate_config: str | None = None) -> JobResult:
        cmd = self.command(module, [str(a) for a in args], accelerate=accelerate, environment=environment,
                           accelerate_config=accelerate_config)
        several = bool(accelerate and accelerate_config and multi_process(self.config_file(accelerate_config)))
        if several:
            # several processes on this machine: a free rendezvous port (two such jobs may run at once) and one
            # OpenMP thread per process (DESIGN §5: oversubscribed OpenMP threads wait at every barrier)
            at = cmd.index("-m", 3)  # before `-m <module>`
            cmd[at:at] = ["--main_process_port", str(free_port())]
        context.log.info("launching: " + " ".join(cmd))
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TQDM_MININTERVAL": "5",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])),
            **({"OMP_NUM_THREADS": "1"} if several else {}),
            **self.extra_env,
        }
        start = time.time()
        with dg.open_pipes_session(
            context=context,
            context_injector=dg.PipesTempFileContextInjector(),
            message_reader=dg.PipesTempFileMessageReader(),
            extras=extras or {},
        ) as session:
            process = subprocess.Popen(
                cmd,
                cwd=str(REPO_ROOT),
                env={**env, **session.get_bootstrap_env_vars()},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                start_new_session=True,  # own process group: cancelling kills the whole accelerate tree
            )
            tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
            readers = [
                threading.Thread(target=self._pump, args=(process.stdout, context.log.info, None), daemon=True),
                threading.Thread(target=self._pump, args=(process.stderr, context.log.info, tail), daemon=True),
            ]
            relay = MessageRelay(session, on_message, context)
            for reader in [*readers, relay]:
                reader.start()
            registration = None
            try:
                registration = register_job(context, process.pid, cmd)
                code = process.wait()
                self.kill_leftovers(process, context)
            except (dg.DagsterExecutionInterruptedError, KeyboardInterrupt):
                context.log.warning(f"run cancelled: ending process group {process.pid}")
                self.terminate(process)
                raise
            finally:
                unregister_job(registration)
                for reader in readers:
                    reader.join(timeout=5)
                relay.stop()
            wall = time.time() - start
            if code != 0:
                lines = list(tail)
                raise dg.Failure(
                    description=(
                        f"{module} {_describe_exit(code, lines)} after {wall:.0f}s.{cause_hint(lines)}\n"
                        "--- last stderr lines ---\n" + "\n".join(lines)
                    ),
                    metadata={"command": " ".join(cmd), "exit_code": code},
                )
        # read the results only after the session has closed: leaving the block waits for the message reader
        # to drain the child's last messages (reading them inside the block races with that reader thread)
        relay.drain()  # the messages the reader got while the session closed
        return job_result(session, wall, cmd)

    @staticmethod
    def _pump(stream, log, tail) -> None:
        for raw in iter(stream.readline, ""):
            line = raw.rstrip()
            if not line:
                continue
            if tail is not None:
                tail.append(line)
            log(line[:2000])
        stream.close()

    @staticmethod
    def kill_leftovers(process: subprocess.Popen, context=None) -> None:
        """SIGKILL whatever is left of the job's process group once its first process has exited.

        A launcher process (``accelerate launch``) killed by a signal leaves its job process running as an
        orphan, which would go on using the accelerator and could publish its output after the asset has
        failed (or while a retry writes the same folder).
        """
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        if context is not None:
            context.log.warning(f"sent SIGKILL to processes left behind in process group {process.pid}")

    def terminate(self, process: subprocess.Popen) -> None:
        """SIGTERM the job's process group, then SIGKILL what is left after the timeout."""
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=self.termination_timeout_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def jobs_dir(root: Path) -> Path:
    return Path(root) / "jobs"


def register_job(context, pgid: int, cmd: list[str]) -> Path | None:
    """Note a running job's process group under the instance root (None when there is no instance)."""
    try:
        root = context.instance.root_directory
        run_id = context.run_id
    except Exception:  # a context without an instance (unit tests)
        return None
    if not root:
        return None
    path = jobs_dir(root) / f"{pgid}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"pgid": pgid, "run_id": run_id, "owner_pid": os.getpid(), "command": cmd,
                                   "started": time.time()}))
        os.replace(tmp, path)
    except OSError as exc:  # the job runs all the same; only the clean-up after a dead worker is lost
        context.log.warning(f"could not register job process group {pgid} under {path.parent}: {exc}")
        return None
    return path


def unregister_job(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def process_alive(pid: int, group: bool = False) -> bool:
    """Whether process ``pid`` (with ``group``: any process of process group ``pid``) is alive; zombies (exited,
    not yet reaped by their parent) count as gone."""
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc").is_dir():
        return True
    for stat in Path("/proc").glob("[0-9]*/stat") if group else [Path(f"/proc/{pid}/stat")]:
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
        except OSError:
            continue
        if (not group or int(fields[2]) == pid) and fields[0] != "Z":
            return True
    return False


def end_orphaned_jobs(root: Path, run_is_over: Callable[[str], bool] = lambda run_id: False) -> list[dict]:
    """SIGKILL the process group of every registered job whose run worker has died (or whose Dagster run is
    over, by ``run_is_over(run_id)``); returns the entries it ended. Their registration files are removed."""
    ended = []
    folder = jobs_dir(root)
    if not folder.is_dir():
        return ended
    for path in sorted(folder.glob("*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if process_alive(entry["owner_pid"]) and not run_is_over(entry["run_id"]):
            continue
        try:
            os.killpg(entry["pgid"], signal.SIGKILL)
            entry["killed"] = True
        except (ProcessLookupError, PermissionError):
            entry["killed"] = False
        path.unlink(missing_ok=True)
        ended.append(entry)
    return ended


def _pool_of(context) -> tuple[str | None, int | None, Path | None]:
    """(pool, its limit, the instance's root folder) of the running step; Nones when there is none."""
    try:
        pool = context.op_def.pool
        instance = context.instance
        root = instance.root_directory
        limit = instance.event_log_storage.get_concurrency_info(pool).limit if pool else None
    except Exception:  # a context without an op or an instance (unit tests), a storage without pools
        return None, None, None
    return pool, limit, Path(root) if root else None


@contextlib.contextmanager
def local_pool_slot(context, poll_s: float = 0.5):
    """Hold one of ``limit`` lock files of the step's pool on this machine (waiting for one to be free)."""
    pool, limit, root = _pool_of(context)
    if not pool or not limit or root is None:
        yield None
        return
    folder = root / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    waiting_since = None
    while True:
        for index in range(limit):
            handle = open(folder / f"pool-{pool}-{index}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                if waiting_since is not None:
                    context.log.info(f"got `{pool}` slot {index} on this machine after "
                                     f"{time.time() - waiting_since:.1f}s")
                yield index
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        if waiting_since is None:
            waiting_since = time.time()
            context.log.info(f"all {limit} `{pool}` slot(s) on this machine are held by other jobs ({folder}); "
                             "waiting for one")
        time.sleep(poll_s)


def multi_process(config_file: str) -> bool:
    """Whether an accelerate config starts several processes on this machine."""
    import yaml

    try:
        settings = yaml.safe_load(Path(config_file).read_text()) or {}
    except OSError:
        return False
    return int(settings.get("num_processes", 1) or 1) > 1 and int(settings.get("num_machines", 1) or 1) == 1


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_environments() -> dict[str, str]:
    """The project venv runs training; `.venv-vllm` (if built) runs generation."""
    envs = {"default": sys.executable}
    vllm_python = REPO_ROOT / ".venv-vllm" / "bin" / "python"
    if vllm_python.exists():
        envs["generation"] = str(vllm_python)
    return envs
