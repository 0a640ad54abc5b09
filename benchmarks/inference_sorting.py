"""Inference throughput with length-sorted batches vs unsorted batches (both dynamically padded).

    .venv/bin/python benchmarks/inference_sorting.py [--rows 384] [--max-length 512] [--batch-size 16]
        [--model-dir OUT/model]

For each data set (default: the shipped ``arena_bench_pairs`` and ``llmbar``), the same rows, the same
tokenised ids, the same model (a trained model directory, or the MiniLM cross-encoder with a fresh head),
the same precision (``--precision``, default auto: what the hardware runs natively) and batch size; only the batch order differs
(``gpu_jobs.predict.predict_ids(sort=...)``). Prints examples/s of each, the share of padding tokens and
the ratio (target >= 1.5x).

The gain is the padding avoided, so it depends on how much row lengths vary below ``max_length``: ~89 % of
arena_bench_pairs rows are longer than 512 tokens (median ~1000), so at 512 nearly every row is cut to the
same length and sorting cannot help; llmbar (median ~260 tokens) shows the effect at 512. With the recipe's
inference length (8192) on an LLM, arena rows vary widely again.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]


def padding_share(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    padded = sum(len(b) * lengths[b].max() for b in batches)
    return 1 - lengths.sum() / padded


def main() -> None:
    from gpu_jobs import inputs as D
    from gpu_jobs.config import load_config
    from gpu_jobs.precision import PRECISIONS, hardware_summary, resolve
    from gpu_jobs.predict import load_model, predict_ids

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", default=["arena_bench_pairs", "llmbar"],
                   help="shipped data set names (data/shipped/<name>.parquet) or parquet paths")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    args = p.parse_args()
    precision = resolve(args.precision, "cpu")
    device = torch.device("cpu")
    if args.model_dir:
        cfg, model, tokenizer = load_model(args.model_dir, device)
    else:
        from gpu_jobs.models import cross_encoder

        cfg = load_config(ROOT / "gpu_jobs" / "configs" / "cross_encoder_minilm.yaml")
        model, tokenizer = cross_encoder.build(cfg)
        model.eval()
    print(hardware_summary())
    print(f"{cfg.name}, max_length {args.max_length}, batch {args.batch_size}, {precision.describe()}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    for name in args.data:
        path = Path(name) if name.endswith(".parquet") else ROOT / "data" / "shipped" / f"{name}.parquet"
        frame = pd.read_parquet(path)
        frame = frame.sample(min(args.rows, len(frame)), random_state=args.seed).reset_index(drop=True)
        ids = D.encode_frame(frame, tokenizer, args.max_length, cfg.text.truncation_side)
        lengths = np.array([len(x) for x in ids])
        print(f"\n{path.stem}: {len(ids)} rows, mean {lengths.mean():.0f} tokens, "
              f"{100 * (lengths >= args.max_length).mean():.0f}% at max_length", flush=True)
        predict_ids(model, ids[: args.batch_size], tokenizer.pad_token_id, args.batch_size, device,
                    precision)  # warm-up
        results = {}
        for sort in (False, True):
            t0 = time.perf_counter()
            probs = predict_ids(model, ids, tokenizer.pad_token_id, args.batch_size, device, precision,
                                sort=sort)
            rate = len(ids) / (time.perf_counter() - t0)
            results[sort] = (rate, probs)
            share = padding_share(lengths, D.sorted_batches(lengths, args.batch_size, sort=sort))
            print(f"  {'length-sorted' if sort else 'unsorted     '} : {rate:6.2f} examples/s, "
                  f"{100 * share:4.1f}% padding tokens", flush=True)
        drift = np.abs(results[True][1] - results[False][1]).max()
        print(f"  speed-up      : {results[True][0] / results[False][0]:6.2f}x (target >= 1.5x); "
              f"max |p_sorted - p_unsorted| = {drift:.1e}", flush=True)


if __name__ == "__main__":
    main()
