"""Launch `gpu_jobs` programs as separate processes through Dagster Pipes.

The local launcher runs ``<python> -m accelerate.commands.launch --config_file ... -m gpu_jobs.<program>``
(or plain ``<python> -m ...`` for programs that need no accelerate) in its own process group, streams the
child's stdout/stderr into the Dagster run log while it runs, ends the whole process tree when the run is
cancelled, and fails the asset with the tail of the child's stderr when it exits non-zero. Each job
program can run in its own Python environment (``environments``: name -> python executable), the local
counterpart of a job image on a cluster.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.pipes.utils import PipesTempFileContextInjector, PipesTempFileMessageReader, open_pipes_session

from arena_pipeline.config import ACCELERATE_DIR, REPO_ROOT

STDERR_TAIL_LINES = 40


@dataclass
class JobResult:
    """What a finished job reported: Pipes metadata, wall time and the command that ran."""

    metadata: dict[str, Any]
    wall_s: float
    command: list[str]
    pipes_results: list = field(default_factory=list)


def _describe_exit(code: int) -> str:
    if code < 0:
        sig = signal.Signals(-code).name
        if -code == signal.SIGKILL:
            return f"was killed by {sig} (most often the kernel's out-of-memory killer; lower batch_size or max_length)"
        return f"was ended by {sig}"
    return f"exited with code {code}"


def _cause_hint(tail: list[str]) -> str:
    text = "\n".join(tail)
    if "CUDA out of memory" in text or "OutOfMemoryError" in text:
        return " Cause: the GPU ran out of memory (lower batch_size / max_length, or enable gradient_checkpointing)."
    if "CUDA error" in text:
        return " Cause: a CUDA error (see the stderr tail; rerun with CUDA_LAUNCH_BLOCKING=1 to locate it)."
    if "MemoryError" in text:
        return " Cause: the host ran out of memory."
    return ""


class JobLauncher(dg.ConfigurableResource):
    """Runs job programs as local subprocesses under Dagster Pipes."""

    accelerate_config: str = str(ACCELERATE_DIR / "cpu_single.yaml")
    environments: dict[str, str] = {}
    extra_env: dict[str, str] = {}
    termination_timeout_s: float = 20.0

    def python_for(self, environment: str) -> str:
        if environment == "default":
            return self.environments.get("default", sys.executable)
        if environment not in self.environments:
            raise dg.Failure(f"launcher has no environment '{environment}' (configured: {sorted(self.environments)})")
        return self.environments[environment]

    def command(self, module: str, args: list[str], *, accelerate: bool, environment: str = "default") -> list[str]:
        python = self.python_for(environment)
        if accelerate:
            return [python, "-m", "accelerate.commands.launch", "--config_file", self.accelerate_config,
                    "-m", module, *args]
        return [python, "-m", module, *args]

    def run(
        self,
        context: dg.AssetExecutionContext,
        module: str,
        args: list[str],
        *,
        accelerate: bool = True,
        environment: str = "default",
        extras: dict | None = None,
    ) -> JobResult:
        cmd = self.command(module, [str(a) for a in args], accelerate=accelerate, environment=environment)
        context.log.info("launching: " + " ".join(cmd))
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TQDM_MININTERVAL": "5",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])),
            **self.extra_env,
        }
        start = time.time()
        with open_pipes_session(
            context=context,
            context_injector=PipesTempFileContextInjector(),
            message_reader=PipesTempFileMessageReader(),
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
            for reader in readers:
                reader.start()
            try:
                code = process.wait()
            except (DagsterExecutionInterruptedError, KeyboardInterrupt):
                context.log.warning(f"run cancelled: ending process group {process.pid}")
                self.terminate(process)
                raise
            finally:
                for reader in readers:
                    reader.join(timeout=5)
            wall = time.time() - start
            if code != 0:
                lines = list(tail)
                raise dg.Failure(
                    description=(
                        f"{module} {_describe_exit(code)} after {wall:.0f}s.{_cause_hint(lines)}\n"
                        "--- last stderr lines ---\n" + "\n".join(lines)
                    ),
                    metadata={"command": " ".join(cmd), "exit_code": code},
                )
            results = list(session.get_results(implicit_materializations=False))
        metadata: dict[str, Any] = {}
        for result in results:
            for key, value in (getattr(result, "metadata", None) or {}).items():
                metadata[key] = value.value if hasattr(value, "value") else value
        return JobResult(metadata=metadata, wall_s=wall, command=cmd, pipes_results=results)

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


def default_environments() -> dict[str, str]:
    """The project venv runs training; `.venv-vllm` (if built) runs generation."""
    envs = {"default": sys.executable}
    vllm_python = REPO_ROOT / ".venv-vllm" / "bin" / "python"
    if vllm_python.exists():
        envs["generation"] = str(vllm_python)
    return envs


def vllm_available(launcher) -> bool:
    """Whether the launcher has a generation environment (a local venv, or an image on a cluster)."""
    if hasattr(launcher, "has_environment"):
        return launcher.has_environment("generation")
    return "generation" in launcher.environments and Path(launcher.environments["generation"]).exists()
