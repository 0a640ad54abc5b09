"""What the neural families share: the ``ModelFamily`` implementation around a family's ``build`` / ``save`` /
``load`` (see ``gpu_jobs.models.registry``), and batched prediction of pre-tokenised rows.

How a family's rows become model inputs is its ``RowIO`` (``NeuralFamily.io(cfg)``): ``encode`` (frame ->
one pre-tokenised row per pair), ``collator`` (batch of rows -> ``input_ids`` / ``attention_mask`` tensors) and
``row_length`` (the cost a row is grouped and sorted by). The default is ``gpu_jobs.inputs``'s one tagged
sequence per row; the siamese families read each side on its own (``gpu_jobs.models.pairwise``) and the
cross-encoder's ``window:`` option reads each part through sliding windows (``gpu_jobs.models.windowed``).
An optional pre-training stage (``NeuralFamily.pretrain``, the reward model's ``pretrain:`` section) runs
on the freshly built model before the loop, kept away from the held-out (validation) rows.

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
from typing import Any, Callable, NamedTuple

import numpy as np


class RowIO(NamedTuple):
    """How a family's rows become model inputs (see the module docstring)."""

    encode: Callable[..., list]  # (frame, tokenizer, max_length, truncation_side, swap=False, max_chars_per_part=0)
    collator: Callable[..., Callable]  # (pad_token_id, pad_to_multiple_of=None) -> collate_fn(items) -> batch
    row_length: Callable[[Any], int] = len  # what batches are grouped and sorted by


def tagged_io() -> RowIO:
    """``gpu_jobs.inputs``'s layout: one tagged sequence per row (prompt, response A, response B)."""
    from gpu_jobs import inputs as D

    return RowIO(D.encode_frame, D.Collator, len)


def siamese_io(cfg=None) -> RowIO:
    """The siamese families' layout (``gpu_jobs.models.pairwise``): (prompt, A) and (prompt, B) read apart."""
    from gpu_jobs.models import pairwise

    return RowIO(pairwise.encode_frame, pairwise.Collator, pairwise.row_length)


def default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device, precision):
    import torch

    if precision is None or not precision.autocast:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def predict_ids(model, ids: list[list[int]], pad_token_id: int, batch_size: int, device, precision=None,
                accelerator=None, sort: bool = True, progress: bool = False, collator=None,
                row_length=len) -> np.ndarray:
    """Class probabilities (n, 3) for pre-tokenised rows, in input order, on every process; autocast in
    ``precision`` (None: the model's own dtype). ``collator`` / ``row_length``: the family's ``RowIO``
    (default: ``gpu_jobs.inputs.Collator``, ``len``)."""
    import torch

    from gpu_jobs import inputs as D

    with torch.inference_mode():
        model.eval()
        batches = D.sorted_batches([row_length(x) for x in ids], batch_size, sort=sort)
        n_proc = accelerator.num_processes if accelerator is not None else 1
        rank = accelerator.process_index if accelerator is not None else 0
        mine = batches[rank::n_proc]  # strided: every process gets a share of the long batches
        collate = (collator or D.Collator)(pad_token_id)
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
    """A family trained by the shared accelerate loop: a model whose ``forward(input_ids, attention_mask)``
    returns 3-class ``logits`` (a ``transformers`` sequence classifier, or a module that answers alike).

    ``io_fn(cfg)`` -> ``RowIO`` or None (None, or no ``io_fn``: ``tagged_io()``); ``pretrain_fn(cfg, model,
    tokenizer, accelerator, held_out, log=None)`` -> metrics dict (``pretrain_*`` keys, ``{}`` when the config
    asks for no pre-training), run on the freshly built model before the training loop."""

    name: str
    config_class: type
    build: Callable[..., tuple[Any, Any]]  # (cfg, device=None) -> (model, tokenizer), untrained head
    save_fn: Callable[..., None]  # (model, tokenizer, model_dir)
    load_fn: Callable[..., tuple[Any, Any]]  # (model_dir, cfg, device=None) -> (model, tokenizer) in eval mode
    head_names: tuple[str, ...]  # parameter-name parts trained at training.head_lr
    io_fn: Callable[[Any], RowIO | None] | None = None
    pretrain_fn: Callable[..., dict] | None = None
    neural: bool = True
    kinds: frozenset[str] = frozenset({"pytorch"})

    def io(self, cfg) -> RowIO:
        """How rows of this config become model inputs (training and prediction alike)."""
        return (self.io_fn(cfg) if self.io_fn is not None else None) or tagged_io()

    def pretrain(self, cfg, model, tokenizer, accelerator, held_out=None, log=None) -> dict:
        """The family's pre-training stage on ``model`` (in place), never touching ``held_out``; its metrics."""
        if self.pretrain_fn is None:
            return {}
        return self.pretrain_fn(cfg, model, tokenizer, accelerator, held_out, log=log)

    def fit(self, cfg, train_df, y, w, accelerator, history_path=None, checkpointer=None, log=None, report=None,
            held_out=None, stop_file=None):
        from gpu_jobs.train import fit_neural

        return fit_neural(cfg, train_df, y, w, accelerator, history_path, checkpointer=checkpointer, log=log,
                          report=report, held_out=held_out, stop_file=stop_file)

    def save(self, model, tokenizer, model_dir) -> None:
        self.save_fn(model, tokenizer, model_dir)

    def load(self, model_dir, cfg, device=None):
        device = device or default_device()
        model, tokenizer = self.load_fn(model_dir, cfg, device=device)
        if not getattr(model, "is_loaded_in_4bit", False):
            model.to(device)
        return model, tokenizer

    def predict(self, cfg, model, tokenizer, frame, tta=False, batch_size=None, max_length=None, device=None,
                accelerator=None, progress=False, precision=None):
        """``precision`` replaces the config's (a dynamically quantised model computes in fp32)."""
        from gpu_jobs import inputs as D
        from gpu_jobs.precision import resolve

        device = device or (accelerator.device if accelerator is not None else default_device())
        batch_size = batch_size or cfg.inference.batch_size
        max_length = max_length or cfg.inference.max_length
        precision = resolve(precision or cfg.precision, device.type)

        io = self.io(cfg)

        def run(swap: bool) -> np.ndarray:
            ids = io.encode(frame, tokenizer, max_length, cfg.text.truncation_side, swap=swap,
                            max_chars_per_part=cfg.text.max_chars_per_part)
            return predict_ids(model, ids, tokenizer.pad_token_id, batch_size, device, precision, accelerator,
                               progress=progress, collator=io.collator, row_length=io.row_length)

        probs = run(swap=False)
        probs_tta = run(swap=True)[:, D.SWAP_PERMUTATION] if tta else None
        return probs, probs_tta


def siamese_family(name: str, config_class: type, make_model: Callable, head_names: tuple[str, ...],
                   **kwargs) -> NeuralFamily:
    """A ``NeuralFamily`` built on ``gpu_jobs.models.pairwise`` (imported when first used, with ``torch``):
    ``make_model(encoder, cfg)`` -> its ``SiameseModel``; the encoder is a transformers folder and the head
    ``head.safetensors``; rows read with ``siamese_io``. ``kwargs``: more ``NeuralFamily`` fields."""

    def build(cfg, device=None):
        from gpu_jobs.models import pairwise

        return pairwise.build(cfg, make_model)

    def save(model, tokenizer, model_dir) -> None:
        from gpu_jobs.models import pairwise

        pairwise.save(model, tokenizer, model_dir)

    def load(model_dir, cfg, device=None):
        from gpu_jobs.models import pairwise

        return pairwise.load(model_dir, cfg, make_model)

    return NeuralFamily(name, config_class, build=build, save_fn=save, load_fn=load, head_names=head_names,
                        io_fn=siamese_io, **kwargs)
