"""Full precision vs quantised inference of one member, on the same rows, in one run.

Prints, per variant (fp32; the config's precision as `auto` resolves it here; int8 / int4 through
`gpu_jobs.quantize`): load seconds, rows/s of the prediction itself, log loss on the rows' labels, the largest
probability change against fp32, and the size of the model's state. With no --model-dir a MiniLM cross-encoder
is first fine-tuned on the shipped arena-bench pairs outside fold 0 (1 epoch, --train-rows rows) and scored on
fold-0 rows, so the log loss is a trained member's.

    .venv/bin/python benchmarks/quantized_inference.py [--model-dir OUT/model] [--rows 200] [--max-length 256]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PAIRS = REPO / "data" / "shipped" / "arena_bench_pairs.parquet"


def train_minilm(target: Path, rows: pd.DataFrame, max_length: int) -> Path:
    from accelerate import Accelerator

    from gpu_jobs import inputs as D
    from gpu_jobs.config import load_config, save_config
    from gpu_jobs.models import cross_encoder
    from gpu_jobs.precision import resolve
    from gpu_jobs.train import fit_neural

    cfg = load_config(REPO / "gpu_jobs" / "configs" / "cross_encoder_minilm.yaml",
                      [f"training.max_length={max_length}", f"inference.max_length={max_length}"])
    accelerator = Accelerator(cpu=True, mixed_precision=resolve(cfg.precision, "cpu").mixed_precision)
    start = time.perf_counter()
    model, tokenizer, _ = fit_neural(cfg, rows, D.targets(rows), D.sample_weights(rows), accelerator, None)
    print(f"trained MiniLM on {len(rows)} rows, {max_length} tokens, 1 epoch: {time.perf_counter() - start:.0f} s",
          flush=True)
    target.mkdir(parents=True, exist_ok=True)
    cross_encoder.save(accelerator.unwrap_model(model), tokenizer, target)
    save_config(cfg, target / "config.yaml")
    return target


def main() -> None:
    import torch

    from gpu_jobs import inputs as D
    from gpu_jobs.contract.metrics import log_loss
    from gpu_jobs.precision import hardware_summary, resolve
    from gpu_jobs.predict import load_model, predict_loaded
    from gpu_jobs.quantize import load_quantized, size_mb

    print(hardware_summary(), flush=True)  # the figures below belong to this hardware
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=None, help="a gpu_jobs.train OUT/model (default: train a MiniLM)")
    parser.add_argument("--rows", type=int, default=200, help="fold-0 rows scored by every variant")
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--modes", default="none,int8", help="quantize modes after fp32 (int4 needs CUDA)")
    args = parser.parse_args()
    torch.manual_seed(0)

    pairs = pd.read_parquet(PAIRS)
    rng = np.random.default_rng(0)
    # folds by prompt, as processed_folds makes them: no prompt on both sides
    fold0 = pd.util.hash_pandas_object(pairs["prompt"], index=False).to_numpy() % 4 == 0
    rows = pairs[fold0].sample(args.rows, random_state=1).reset_index(drop=True)
    y = D.targets(rows)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else train_minilm(
            Path(tmp) / "model", pairs[~fold0].sample(args.train_rows, random_state=int(rng.integers(1000)))
            .reset_index(drop=True), args.max_length)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        variants = [("fp32", "none", "fp32")] + [(m, m, None) for m in args.modes.split(",")]
        results, reference = [], None
        for label, mode, precision in variants:
            start = time.perf_counter()
            if mode == "none":
                cfg, model, tokenizer = load_model(model_dir, device)
                method = "none"
            else:
                cfg, model, tokenizer, record = load_quantized(model_dir, mode, device)
                method = record["method"]
                precision = "fp32" if method.startswith("torch.ao") else None
            loaded = time.perf_counter() - start
            run_device = torch.device("cpu") if method.startswith("torch.ao") else device
            predict_loaded(cfg, model, tokenizer, rows.head(args.batch_size), batch_size=args.batch_size,
                           max_length=args.max_length, device=run_device, precision=precision)  # warm-up
            start = time.perf_counter()
            probs, _ = predict_loaded(cfg, model, tokenizer, rows, batch_size=args.batch_size,
                                      max_length=args.max_length, device=run_device, precision=precision)
            seconds = time.perf_counter() - start
            reference = probs if reference is None else reference
            if label == "none":
                label = f"config {resolve(cfg.precision, run_device.type).name}"
            results.append((label, method, loaded, len(rows) / seconds, log_loss(y, probs),
                            float(np.abs(probs - reference).max()), size_mb(model)))
            del model
    print(f"model: {model_dir if args.model_dir else 'MiniLM fine-tuned here'}; rows: {len(rows)} "
          f"(arena-bench fold 0), max_length {args.max_length}, batch {args.batch_size}, device {device}")
    print(f"{'variant':<14} {'load s':>7} {'rows/s':>8} {'log loss':>9} {'max|dp|':>8} {'MB':>7}  method")
    for label, method, loaded, rate, loss, delta, mb in results:
        print(f"{label:<14} {loaded:7.1f} {rate:8.1f} {loss:9.4f} {delta:8.4f} {mb:7.1f}  {method}")
    base = results[0][3]
    print("speed-up vs fp32: " + ", ".join(f"{r[0]} {r[3] / base:.2f}x" for r in results[1:]))


if __name__ == "__main__":
    main()
