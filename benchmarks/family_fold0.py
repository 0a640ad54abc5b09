"""Fold-0 log loss and training cost of one member on the demo's processed folds (issue #16).

    PYTHONPATH=. python benchmarks/family_fold0.py gpu_jobs/configs/reward_model_minilm.yaml OUT \
        --set training.max_train_rows=1000 training.max_length=256 inference.max_length=256

Builds ``processed_folds`` exactly as the demo does (raw assets' load_clean with the demo's row caps, then
build_processed: StratifiedGroupKFold grouped by prompt, external sets at fold -1), writes it to
OUT/processed_folds.parquet and runs the same ``gpu_jobs.train`` job the oof assets launch, on fold 0.
Prints the job's metrics.json (val_log_loss, train_examples_per_s, wall_s, ...).

    PYTHONPATH=. python benchmarks/family_fold0.py --blend OUT/features OUT/bi_encoder_minilm

scores the two-member linear blend w * first + (1 - w) * second of two such jobs' oof.parquet, with w
chosen on a grid on one half of the rows and scored on the other (both ways, averaged; halves seeded).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from arena_pipeline.assets.raw import load_clean
from arena_pipeline.profile import DEMO
from arena_pipeline.data.folds import build_processed


def demo_folds(out: Path) -> Path:
    path = out / "processed_folds.parquet"
    if path.exists():
        return path
    marks = {"tie_free_sources": DEMO.data.tie_free_sources}
    labelled, _ = load_clean(list(DEMO.data.labelled), labelled=True, limit=DEMO.max_labelled_rows, seed=DEMO.seed,
                             **marks)
    external, _ = load_clean(list(DEMO.data.external), labelled=True, limit=DEMO.max_external_rows, seed=DEMO.seed,
                             **marks)
    frame, _ = build_processed(labelled, [external] if len(external) else [], n_folds=DEMO.n_folds, seed=DEMO.seed)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path)
    return path


def blend(first: Path, second: Path) -> dict:
    import numpy as np
    import pandas as pd

    from gpu_jobs.contract.metrics import log_loss

    cols = ["p_a", "p_b", "p_tie"]
    a, b = (pd.read_parquet(d / "oof.parquet").set_index("id").sort_index() for d in (first, second))
    data = pd.read_parquet(first.parent / "processed_folds.parquet").set_index("id").loc[a.index]
    y = data[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy().argmax(1)
    pa, pb = a[cols].to_numpy(), b.loc[a.index, cols].to_numpy()
    grid = np.linspace(0, 1, 21)
    half = np.random.default_rng(0).permutation(len(y)) < len(y) // 2
    scores, weights = [], []
    for fit in (half, ~half):
        w = min(grid, key=lambda w: log_loss(y[fit], w * pa[fit] + (1 - w) * pb[fit]))
        weights.append(float(w))
        scores.append(log_loss(y[~fit], w * pa[~fit] + (1 - w) * pb[~fit]))
    return {"first_alone": log_loss(y, pa), "second_alone": log_loss(y, pb),
            "blend_cross_validated": float(np.mean(scores)), "weights_on_first": weights}


def main() -> int:
    if sys.argv[1:2] == ["--blend"]:
        print(json.dumps(blend(Path(sys.argv[2]), Path(sys.argv[3])), indent=1))
        return 0
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("out", type=Path)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], dest="overrides")
    args = p.parse_args()
    data = demo_folds(args.out)
    job = args.out / Path(args.config).stem
    cmd = [sys.executable, "-m", "gpu_jobs.train", "--config", args.config, "--fold", str(args.fold),
           "--data", str(data), "--output-dir", str(job)]
    if args.overrides:
        cmd += ["--set", *args.overrides]
    subprocess.run(cmd, check=True)
    print(json.dumps(json.loads((job / "metrics.json").read_text()), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
