"""Where each asset's files live under the state folder, and atomic writes (``gpu_jobs.contract.atomic``).

Assets write their own files (parquet, model folders, JSON) and return metadata; downstream assets find
them through this resource by name, so a person can open every intermediate result from a shell.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import dagster as dg

from gpu_jobs.contract.atomic import atomic_write_json as _atomic_write_json
from gpu_jobs.contract.atomic import atomic_write_parquet  # noqa: F401  (assets import it from here)


def atomic_write_json(obj, path: Path) -> Path:
    """The contract's atomic JSON write with the state folder's layout: indented, sorted keys, str fallback."""
    return _atomic_write_json(obj, path, indent=2, sort_keys=True, default=str)


class OverwriteError(ValueError):
    """An output path would replace (or sit inside) one of the inputs of the same command or asset."""


def _within(path: Path, other: Path) -> bool:
    """``path`` is ``other`` or lies inside it, compared as files (symlinks, hard links, ``./x`` vs ``x``)."""
    for candidate in (path, *path.parents):
        try:
            if os.path.samefile(candidate, other):
                return True
        except OSError:  # not there (yet): cannot be an existing input
            continue
    return False


def refuse_overwrite(outputs: list[tuple[str, str | Path]], inputs: list[tuple[str, str | Path]]) -> None:
    """Raise ``OverwriteError`` (one line naming both paths) when writing any output would destroy an input.

    ``outputs`` and ``inputs`` are (label, path) pairs, the label naming the option (``--output``, ``test_path``). An output collides with an
    input when it is the same file, when it lies inside an input folder, or when the input lies inside an
    output folder (folders are replaced whole). Call it before anything is written; ``hf://`` inputs are skipped.
    """
    for out_label, out in outputs:
        out_path = Path(os.path.abspath(out))
        for in_label, inp in inputs:
            if not inp or str(inp).startswith("hf://"):
                continue
            in_path = Path(os.path.abspath(inp))
            if _within(out_path, in_path) or _within(in_path, out_path):
                raise OverwriteError(f"{out_label} {out} would overwrite {in_label} {inp} (the same file, or one "
                                     "inside the other); nothing written. Choose an output path outside the inputs.")


def file_version(path: Path) -> str:
    """Content hash (12 hex) used as the Dagster data version and the MLflow `data_version` tag."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


class ArenaStorage(dg.ConfigurableResource):
    """Paths of every asset's files under one home folder (default: ``$DAGSTER_HOME/arena``)."""

    home: str = ""

    @property
    def root(self) -> Path:
        if self.home:
            root = Path(self.home)
        else:
            from arena_pipeline.profile import dagster_home

            root = dagster_home() / "arena"
        root.mkdir(parents=True, exist_ok=True)
        return root

    def data(self, name: str) -> Path:
        """A table asset's parquet file, e.g. ``data('processed_folds')``."""
        return self.root / "data" / f"{name}.parquet"

    def job_dir(self, stage: str, model: str, fold: int) -> Path:
        """Output folder of one training job (contract 2)."""
        return self.root / stage / model / f"fold{fold}"

    def pool_predictions(self, model: str, fold: int) -> Path:
        return self.root / "pseudo" / "teachers" / model / f"fold{fold}.parquet"

    def pseudo_labels(self, fold: int) -> Path:
        return self.root / "pseudo" / f"pseudo_labels_fold{fold}.parquet"

    def ensemble(self, name: str) -> Path:
        return self.root / "ensembles" / f"{name}.json"

    def scratch(self, name: str) -> Path:
        path = self.root / "scratch" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def bundle_dir(self) -> Path:
        return self.root / "bundle"

    @property
    def incoming_dir(self) -> Path:
        """Folder watched by the new-unlabelled-data sensor."""
        path = self.root / "incoming"
        path.mkdir(parents=True, exist_ok=True)
        return path
