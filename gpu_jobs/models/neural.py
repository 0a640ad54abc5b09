"""What the neural families share: the ``ModelFamily`` implementation around a family's ``build`` / ``save`` /
``load`` (see ``gpu_jobs.models.registry``), and batched prediction of pre-tokenised rows.

Training is the shared accelerate loop, ``gpu_jobs.train.fit_neural`` (imported when called: the loop
belongs to the training job). Prediction tokenises the rows, sorts them by length (longest first), cuts them
into batches padded to their own longest row and returns results in input order; TTA swaps A and B in the
text, predicts, and permutes the output back with [1, 0, 2]. With several processes each one predicts every
n-th batch of the sorted order (so the long batches are spread evenly), and the pieces are gathered.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


def default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device, precision):
    import torch

    if precision is None or not precision.autocast:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def predict_ids(model, ids: list[list[int]], pad_token_id: int, batch_size: int, device, precision=None,
                accelerator=None, sort: bool = True, progress: bool = False) -> np.ndarray:
    """Class probabilities (n, 3) for pre-tokenised rows, in input order, on every process; autocast in
    ``precision`` (None: the model's own dtype)."""
    import torch

    from gpu_jobs import data as D

    with torch.inference_mode():
        model.eval()
        batches = D.sorted_batches([len(x) for x in ids], batch_size, sort=sort)
        n_proc = accelerator.num_processes if accelerator is not None else 1
        rank = accelerator.process_index if accelerator is not None else 0
        mine = batches[rank::n_proc]  # strided: every process gets a share of the long batches
        collate = D.Collator(pad_token_id)
        pieces: list[tuple[np.ndarray, np.ndarray]] = []
        if progress and rank == 0:
            from tqdm.auto import tqdm

            mine = tqdm(mine, desc="predict", leave=False)
        for rows in mine:
            batch = collate([{"input_ids": ids[i], "index": int(i)} for i in rows])
            with _autocast(device, precision):
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits
            probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
            pieces.append((np.asarray(rows), probs))
    if n_proc > 1:
        from accelerate.utils import gather_object

        print(f"gpu_jobs.predict: process {rank}/{n_proc} predicted {sum(len(r) for r, _ in pieces)} of "
              f"{len(ids)} rows", file=sys.stderr, flush=True)
        pieces = gather_object(pieces)
    out = np.full((len(ids), 3), np.nan, dtype=np.float64)
    seen = np.zeros(len(ids), dtype=np.int64)
    for rows, probs in pieces:
        out[rows] = probs
        seen[rows] += 1
    if not (seen == 1).all():
        raise RuntimeError(f"prediction covered rows {int((seen == 0).sum())} times 0 and "
                           f"{int((seen > 1).sum())} times >1; expected every row exactly once")
    return out


@dataclass(frozen=True)
class NeuralFamily:
    """A family trained by the shared accelerate loop: a ``transformers`` 3-class sequence classifier."""

    name: str
    config_class: type
    build: Callable[..., tuple[Any, Any]]  # (cfg, device=None) -> (model, tokenizer), untrained head
    save_fn: Callable[..., None]  # (model, tokenizer, model_dir)
    load_fn: Callable[..., tuple[Any, Any]]  # (model_dir, cfg, device=None) -> (model, tokenizer) in eval mode
    head_names: tuple[str, ...]  # parameter-name parts trained at training.head_lr
    neural: bool = True
    kinds: frozenset[str] = frozenset({"pytorch"})

    def fit(self, cfg, train_df, y, w, accelerator, history_path=None, checkpointer=None, log=None, report=None):
        from gpu_jobs.train import fit_neural

        return fit_neural(cfg, train_df, y, w, accelerator, history_path, checkpointer=checkpointer, log=log,
                          report=report)

    def save(self, model, tokenizer, model_dir) -> None:
        self.save_fn(model, tokenizer, model_dir)

    def load(self, model_dir, cfg, device=None):
        device = device or default_device()
        model, tokenizer = self.load_fn(model_dir, cfg, device=device)
        if not getattr(model, "is_loaded_in_4bit", False):
            model.to(device)
        return model, tokenizer

    def predict(self, cfg, model, tokenizer, frame, tta=False, batch_size=None, max_length=None, device=None,
                accelerator=None, progress=False):
        from gpu_jobs import data as D
        from gpu_jobs.precision import resolve

        device = device or (accelerator.device if accelerator is not None else default_device())
        batch_size = batch_size or cfg.inference.batch_size
        max_length = max_length or cfg.inference.max_length
        precision = resolve(cfg.precision, device.type)

        def run(swap: bool) -> np.ndarray:
            ids = D.encode_frame(frame, tokenizer, max_length, cfg.text.truncation_side, swap=swap,
                                 max_chars_per_part=cfg.text.max_chars_per_part)
            return predict_ids(model, ids, tokenizer.pad_token_id, batch_size, device, precision, accelerator,
                               progress=progress)

        probs = run(swap=False)
        probs_tta = run(swap=True)[:, D.SWAP_PERMUTATION] if tta else None
        return probs, probs_tta
