"""Dagster Pipes for the jobs, opened on the main process only (DESIGN §9, last bullet).

    with open_pipes() as pipes:
        pipes.log.info("training")
        pipes.report_asset_materialization(metadata={"val_log_loss": 0.93})

When ``DAGSTER_PIPES_CONTEXT`` is set and this process is the main one, this is the real
``dagster_pipes.open_dagster_pipes()`` context. Otherwise (run by hand, or a rank > 0 of a multi-process
launch, which inherits the same Pipes environment) it is a no-op stand-in with the same methods that logs
to stderr, so two ranks never both report to Dagster. A job run in an environment without ``dagster-pipes``
(the vLLM venv) gets the stand-in too, with a warning, when ``DAGSTER_PIPES_CONTEXT`` is set.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from typing import Any, Iterator, Mapping

PIPES_ENV = "DAGSTER_PIPES_CONTEXT"

_logger = logging.getLogger("gpu_jobs")
if not _logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s gpu_jobs: %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(logging.INFO)
    _logger.propagate = False


class NoOpPipes:
    """Stand-in for ``dagster_pipes.PipesContext``: same reporting methods; logs, reports nothing."""

    def __init__(self, quiet: bool = False):
        # quiet: a logger outside the "gpu_jobs" tree (whose handler would echo it), with no handler of its
        # own: info is dropped, warnings and errors still reach stderr through logging's last resort
        self.log = _logger if not quiet else logging.getLogger("gpu_jobs_quiet")
        self.materializations: list[dict[str, Any]] = []  # kept for tests and for reading by hand
        self.extras: dict[str, Any] = {}

    def report_asset_materialization(self, metadata: Mapping[str, Any] | None = None, data_version: str | None = None,
                                     asset_key: str | None = None) -> None:
        self.materializations.append({"metadata": dict(metadata or {}), "data_version": data_version,
                                      "asset_key": asset_key})

    def report_asset_check(self, *args, **kwargs) -> None:
        pass

    def report_custom_message(self, payload: Any) -> None:
        pass


def is_main_process() -> bool:
    """Rank 0 of the launch (accelerate's view when available, else the RANK environment variable)."""
    try:
        from accelerate import PartialState

        return bool(PartialState().is_main_process)
    except Exception:  # noqa: BLE001 - accelerate missing or no process group: fall back on the env
        return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def open_pipes(quiet: bool = False) -> Iterator[Any]:
    """The Dagster Pipes context on the main process of a Dagster-launched job; a no-op stand-in otherwise.

    ``quiet=True``: the stand-in does not echo ``log`` calls to stderr (for a job that prints its own log)."""
    if os.environ.get(PIPES_ENV) and is_main_process():
        try:
            from dagster_pipes import open_dagster_pipes
        except ImportError:
            print(f"warning: {PIPES_ENV} is set but dagster-pipes is not installed in this environment; "
                  "nothing is reported to Dagster", file=sys.stderr)
            yield NoOpPipes(quiet=quiet)
            return
        with open_dagster_pipes() as pipes:
            yield pipes
    else:
        yield NoOpPipes(quiet=quiet or not is_main_process())


def clean_metadata(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata Pipes can carry: plain numbers/strings; NaN/inf become None."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out
