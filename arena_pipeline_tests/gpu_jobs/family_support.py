"""Helpers shared by the tests of the issue-16 families (reward model, bi-encoder, sliding windows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from gpu_jobs import inputs as D

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "data" / "shipped" / "arena_bench_pairs.parquet"
CONFIGS = ROOT / "gpu_jobs" / "configs"


def rows(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` real arena-bench pairs with folds 0, 1, 2, 3, 0, ..."""
    frame = pd.read_parquet(PAIRS).sample(n, random_state=seed).reset_index(drop=True)
    return frame.assign(fold=np.arange(n) % 4)


def cpu_accelerator(mixed_precision: str = "no"):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=True, mixed_precision=mixed_precision)


def reset_accelerator() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def overfit_stats(cfg, frame: pd.DataFrame) -> dict:
    """``fit_neural`` on ``frame`` (fp32, CPU): the loop's stats."""
    from gpu_jobs.train import fit_neural

    try:
        _, _, stats = fit_neural(cfg, frame, D.targets(frame), D.sample_weights(frame), cpu_accelerator(), None)
    finally:
        reset_accelerator()
    return stats


def run_train_job(config: Path, frame: pd.DataFrame, tmp_path: Path, fold: int, overrides: list[str],
                  extra: list[str] = ()) -> tuple[Path, dict]:
    """``gpu_jobs.train.main`` in this process on ``frame``; returns (OUT, metrics.json)."""
    from gpu_jobs.train import main

    data = tmp_path / "train.parquet"
    frame.to_parquet(data)
    out = tmp_path / "out"
    reset_accelerator()
    try:
        main(["--config", str(config), "--fold", str(fold), "--data", str(data), "--output-dir", str(out),
              *extra, "--set", *overrides])
    finally:
        reset_accelerator()
    return out, json.loads((out / "metrics.json").read_text())
