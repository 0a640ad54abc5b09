"""Prediction with a trained model directory (contract 3).

    accelerate launch -m gpu_jobs.predict --model-dir OUT/model --data rows.parquet --output preds.parquet [--tta]

    from gpu_jobs.predict import predict_frame
    probs, probs_tta = predict_frame("OUT/model", frame, tta=True)   # (n, 3) A, B, tie, in input order

Rows are tokenised, sorted by length (longest first) and cut into batches padded to their own longest row;
results come back in input order. TTA swaps A and B in the text, predicts, and permutes the output back
with [1, 0, 2]. With several processes each one predicts every n-th batch of the sorted order (so the
long batches are spread evenly), the main process gathers the pieces and writes every row exactly once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from gpu_jobs import inputs as D
from gpu_jobs.config import config_from_dict
from gpu_jobs.contract.atomic import atomic_write_json, atomic_write_parquet
from gpu_jobs.inputs import prediction_frame  # noqa: F401  (re-exported: callers' predict.prediction_frame)
from gpu_jobs.models.neural import default_device, predict_ids  # noqa: F401  (re-exported for callers)
from gpu_jobs.models.registry import family_of
from gpu_jobs.precision import resolve


def load_model_config(model_dir: str | Path):
    path = Path(model_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no config.yaml in the model directory; is {model_dir} a gpu_jobs.train output?")
    with open(path) as fh:
        return config_from_dict(yaml.safe_load(fh), str(path))


def load_model(model_dir: str | Path, device: torch.device | None = None):
    """(cfg, model, tokenizer) from a model directory; tokenizer is None for a family without one."""
    cfg = load_model_config(model_dir)
    model, tokenizer = family_of(cfg).load(Path(model_dir), cfg, device=device)
    return cfg, model, tokenizer


def predict_loaded(cfg, model, tokenizer, frame: pd.DataFrame, tta: bool = False, batch_size: int | None = None,
                   max_length: int | None = None, device: torch.device | None = None, accelerator=None,
                   progress: bool = False, precision: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Predict with a model already in memory (train.py calls this with the model it just trained);
    ``precision`` replaces the config's (a dynamically quantised model computes in fp32)."""
    return family_of(cfg).predict(cfg, model, tokenizer, frame, tta=tta, batch_size=batch_size,
                                  max_length=max_length, device=device, accelerator=accelerator, progress=progress,
                                  precision=precision)


def predict_frame(model_dir: str | Path, frame: pd.DataFrame, tta: bool = False, batch_size: int | None = None,
                  max_length: int | None = None, accelerator=None, quantize: str = "none",
                  record: dict | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (n, 3) for A, B, tie in input order, and the TTA (A/B swapped, permuted back) ones.
    ``quantize``: one of gpu_jobs.quantize.QUANTIZE_MODES; how the model was quantised is put in ``record``."""
    device = accelerator.device if accelerator is not None else None
    if quantize == "none":
        cfg, model, tokenizer = load_model(model_dir, device)
        how = {"mode": "none", "method": "none", "family": cfg.family, "reason": "full precision asked"}
    else:
        from gpu_jobs.quantize import DYNAMIC_INT8, load_quantized

        cfg, model, tokenizer, how = load_quantized(model_dir, quantize, device)
        if how["method"] == DYNAMIC_INT8:  # int8 kernels on the CPU take fp32 activations
            device = torch.device("cpu")
    if record is not None:
        record.update(how)
    fp32 = "fp32" if how["method"].startswith("torch.ao") else None
    if not family_of(cfg).neural and accelerator is not None and accelerator.num_processes > 1:
        # a non-neural model is cheap: the main process predicts everything, the others return nothing
        if not accelerator.is_main_process:
            return np.zeros((0, 3)), None
    return predict_loaded(cfg, model, tokenizer, frame, tta, batch_size, max_length, device, accelerator,
                          progress=True, precision=fp32)


def tta_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(f"{output.stem}_tta{output.suffix or '.parquet'}")


def quantization_path(output: str | Path) -> Path:
    """Where the predict job writes how its model was quantised (JSON record, gpu_jobs.quantize)."""
    output = Path(output)
    return output.with_name(f"{output.stem}.quantization.json")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_jobs.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="OUT/model of a gpu_jobs.train run")
    p.add_argument("--data", required=True, help="parquet with id, prompt, response_a, response_b")
    p.add_argument("--output", required=True, help="parquet to write: id, p_a, p_b, p_tie")
    p.add_argument("--tta", action="store_true", help="also write <output stem>_tta.parquet (A/B swapped)")
    p.add_argument("--batch-size", type=int, default=None, help="default: inference.batch_size of the config")
    p.add_argument("--max-length", type=int, default=None, help="default: inference.max_length of the config")
    p.add_argument("--quantize", default="none", choices=("none", "int8", "int4"),
                   help="int8: dynamic int8 for encoders on a CPU, bitsandbytes 8-bit for decoders on CUDA; int4: bitsandbytes "
                        "NF4 for decoders on CUDA (CPU: falls back to int8). Writes <output stem>.quantization.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from accelerate import Accelerator

    from gpu_jobs.contract.pipes import open_pipes

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    with open_pipes() as pipes:
        try:
            frame = D.read_frame(args.data)
            requested = getattr(load_model_config(args.model_dir), "precision", None)  # features: none
            if requested is not None and accelerator.is_main_process:
                precision = resolve(requested, accelerator.device.type)
                if precision.warning:
                    pipes.log.warning(precision.warning)
                pipes.log.info(f"gpu_jobs.predict: {precision.describe()}")
            t0 = time.perf_counter()
            record: dict = {}
            probs, probs_tta = predict_frame(args.model_dir, frame, args.tta, args.batch_size, args.max_length,
                                             accelerator=accelerator, quantize=args.quantize, record=record)
            seconds = time.perf_counter() - t0
            if accelerator.is_main_process:
                if args.quantize != "none":
                    pipes.log.info(f"gpu_jobs.predict: quantisation {record['method']} ({record['reason']})")
                    atomic_write_json(record, quantization_path(args.output), indent=2)
                atomic_write_parquet(prediction_frame(frame["id"], probs), args.output)
                if probs_tta is not None:
                    atomic_write_parquet(prediction_frame(frame["id"], probs_tta), tta_path(args.output))
                rate = len(frame) * (2 if args.tta else 1) / max(seconds, 1e-9)
                pipes.log.info(f"predicted {len(frame)} rows -> {args.output} ({rate:.1f} examples/s)")
                pipes.report_asset_materialization(metadata={"n_rows": len(frame), "predict_examples_per_s": rate,
                                                             "output": str(args.output),
                                                             "quantization": record["method"]})
        except Exception as exc:
            pipes.log.error(f"gpu_jobs.predict failed: {type(exc).__name__}: {exc}")
            raise
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
