"""Throughput probe: how long one model config takes per training and per prediction example, here.

    python -m gpu_jobs.probe --config gpu_jobs/configs/cross_encoder_minilm.yaml --data rows.parquet \
        [--set training.max_length=256 ...] [--rows 8]

Runs two optimiser steps of ``--rows`` rows each (the job's own text encoding, lengths and precision) and
times the second (the first pays one-time kernel set-up), then predicts the rows twice and times the second
pass. Prints one JSON line: ``name``, ``precision``, ``load_s`` (model build and first step),
``train_s_per_example``, ``predict_s_per_example``: a planning figure for sizing a run to a time budget
(``arena-pipeline demo``). Small batches are less efficient than the job's own, so it errs on the slow side.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpu_jobs import inputs as D
from gpu_jobs.config import load_config
from gpu_jobs.models.registry import family_of
from gpu_jobs.precision import resolve


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_jobs.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="gpu_jobs/configs/<model>.yaml (a neural family)")
    p.add_argument("--data", required=True, help="parquet of labelled pairs to time on (contract 2 columns)")
    p.add_argument("--rows", type=int, default=8, help="rows in the one timed batch (default 8)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="config overrides, as for gpu_jobs.train")
    args = p.parse_args(argv)
    if args.rows < 1:
        p.error("--rows must be >= 1")
    return args


def probe(cfg, frame, accelerator) -> dict:
    family = family_of(cfg)
    rows = len(frame) // 2
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        history_path = Path(tmp) / "history.jsonl"
        model, tokenizer, stats = family.fit(cfg, frame, D.targets(frame), D.sample_weights(frame), accelerator,
                                             history_path)
        elapsed = [json.loads(line)["elapsed_s"] for line in history_path.read_text().splitlines()]
    total_s = time.perf_counter() - t0
    second_step_s = elapsed[-1] - elapsed[-2]
    half = frame.head(rows)
    family.predict(cfg, model, tokenizer, half, accelerator=accelerator)  # warm-up
    t1 = time.perf_counter()
    family.predict(cfg, model, tokenizer, half, accelerator=accelerator)
    predict_s = time.perf_counter() - t1
    return {"load_s": round(total_s - second_step_s, 2), "train_s_per_example": second_step_s / rows,
            "predict_s_per_example": predict_s / rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    asked = load_config(args.config, args.overrides)
    if not family_of(asked).neural:
        raise SystemExit(f"gpu_jobs.probe: the {asked.family} family fits in seconds; there is nothing to probe")
    cfg = load_config(args.config, [*args.overrides, f"training.batch_size={args.rows}", "training.epochs=1",
                                    "training.group_by_length=false",
                                    "training.grad_accum=1", "training.warmup_steps=0", "training.max_train_rows=null",
                                    "training.swap_augment=false", "training.checkpoint_every_steps=null"])
    from accelerate import Accelerator

    precision = resolve(cfg.precision)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision.mixed_precision)
    frame = D.read_frame(args.data)
    frame = frame[frame["winner_model_a"].notna()] if "winner_model_a" in frame.columns else frame
    if len(frame) < 2 * args.rows:
        raise SystemExit(f"gpu_jobs.probe: {args.data} has {len(frame)} labelled rows; 2 x --rows = {2 * args.rows} needed")
    frame = frame.sample(n=2 * args.rows, random_state=cfg.seed).reset_index(drop=True)
    result = {"name": cfg.name, "precision": precision.name, "rows": args.rows, **probe(cfg, frame, accelerator)}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
