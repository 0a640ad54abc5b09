"""The launcher interface the assets use, whichever backend runs the job programs.

An asset asks for the ``launcher`` resource as a :class:`Launcher` and calls::

    launcher.run(context, "gpu_jobs.train", args, accelerate=True, environment="default", extras={...},
                 on_message=run.on_message, accelerate_config=None) -> JobResult

Two backends implement it: :class:`arena_pipeline.resources.launcher.JobLauncher` (local subprocesses) and
:class:`arena_pipeline.resources.k8s_launcher.K8sJobLauncher` (Kubernetes pods; a Kubeflow ``PyTorchJob`` for
multi-node training). Both run the job under a Dagster Pipes session and turn what it reported into a
:class:`JobResult` with :func:`job_result`; ``definitions.py`` picks one (``ARENA_LAUNCHER``).
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import dagster as dg


@dataclass
class JobResult:
    """What a finished job reported: Pipes metadata, wall time and the command that ran."""

    metadata: dict[str, Any]
    wall_s: float
    command: list[str]
    pipes_results: list = field(default_factory=list)


class Launcher(dg.ConfigurableResource):
    """Runs ``python -m <module> <args>`` (under ``accelerate launch`` when ``accelerate``) as a separate job."""

    @abstractmethod
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
        """Run one job program and wait for it. ``environment``: the Python environment (a venv locally, an image
        on a cluster); ``extras``: Pipes extras the job reads; ``on_message``: gets each Pipes custom message
        (per-step metrics); ``accelerate_config``: a member's own accelerate config file name. A failed job raises
        ``dg.Failure`` naming the likely cause and quoting the end of its output."""

    @abstractmethod
    def has_environment(self, environment: str) -> bool:
        """Whether jobs can run in ``environment`` (e.g. ``"generation"``: the vLLM environment)."""


def job_result(pipes, wall_s: float, command: list[str]) -> JobResult:
    """A JobResult from a closed Pipes session or a completed Pipes client invocation (both ``get_results``):
    the metadata of what the job reported, as plain values."""
    results = list(pipes.get_results(implicit_materializations=False))
    metadata: dict[str, Any] = {}
    for result in results:
        for key, value in (getattr(result, "metadata", None) or {}).items():
            metadata[key] = value.value if hasattr(value, "value") else value
    return JobResult(metadata=metadata, wall_s=wall_s, command=command, pipes_results=results)


def cause_hint(tail: list[str]) -> str:
    """The likely cause of a failed job, from the last lines of its output ("" when none is recognised)."""
    text = "\n".join(tail)
    if "CUDA out of memory" in text or "OutOfMemoryError" in text:
        return " Cause: the GPU ran out of memory (lower batch_size / max_length, or enable gradient_checkpointing)."
    if "CUDA error" in text:
        return " Cause: a CUDA error (see the stderr tail; rerun with CUDA_LAUNCH_BLOCKING=1 to locate it)."
    if "MemoryError" in text:
        return " Cause: the host ran out of memory."
    return ""


class MessageRelay(threading.Thread):
    """Hands a Pipes session's custom messages to ``on_message`` as they arrive (polled once a second)."""

    def __init__(self, session, on_message: Callable[[Any], None] | None, context, poll_s: float = 1.0):
        super().__init__(daemon=True)
        self.session, self.on_message, self.context, self.poll_s = session, on_message, context, poll_s
        self.seen = 0
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._warned = False

    def run(self) -> None:
        if self.on_message is None:
            return
        while not self._stop_event.wait(self.poll_s):
            self.drain()

    def drain(self) -> None:
        if self.on_message is None:
            return
        with self._lock:
            messages = self.session.get_custom_messages()
            for message in messages[self.seen:]:
                try:
                    self.on_message(message)
                except Exception as exc:  # noqa: BLE001 - a tracking hiccup must not fail the job
                    if not self._warned:
                        self.context.log.warning(f"could not record a job message: {type(exc).__name__}: {exc}")
                        self._warned = True
            self.seen = len(messages)

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=10)
