"""DPO member: a causal LM tuned with Direct Preference Optimisation, read as a pairwise judge.

**Policy and reference.** The policy is the decoder of ``model_name`` with a LoRA adapter (QLoRA: 4-bit NF4
base, as ``llm_classifier`` builds it: ``llm_classifier._base_model(causal_lm=True)`` and ``wrap_lora``). The
reference model is the same base with the adapter switched off (peft's ``disable_adapter()``), so there is no
second copy of the weights; the reference log-probabilities of the training pairs are computed once, before
the first step (the reference never changes).

**Text.** Each side is its own conversation in the model's chat template, user and assistant turns
interleaved (``gpu_jobs.sft.messages_of`` / ``encode_conversation``: multi-turn aware, cut at
``max_length`` tokens from its end); log pi(answer | x) is the sum of the log-probabilities of the assistant
tokens of every turn (the answer and its end-of-turn token), never of the user text.

**Loss.** With h = beta * [(log pi(A|x) - log pi_ref(A|x)) - (log pi(B|x) - log pi_ref(B|x))] and t the
target P(A preferred to B), the loss is the weighted binary cross-entropy -[t log sigma(h) + (1 - t) log
sigma(-h)]: for a won pair (t = 1 or 0) exactly DPO's sigmoid loss -log sigma(beta * [(chosen log-ratio) -
(rejected log-ratio)]). Ties (``dpo.ties``): ``drop`` (default) leaves them out of the loss — DPO has no
notion of "equally good", and a tie says nothing about which answer to raise — and keeps them for the
calibration, which is where the tie probability is learned; ``half`` gives a tie the target t = 1/2 (the
loss pulls its margin to 0). Soft targets (pseudo labels) follow the same rule: t = p_A / (p_A + p_B) with
weight (p_A + p_B) x sample weight under ``drop``, t = p_A + p_tie / 2 under ``half``.

**Three classes.** The implicit reward margin of a pair, m = h above, is mapped to [P(A), P(B), P(tie)] by a
Davidson model on the margin (the reward model's form, ``pairwise.davidson_logits``, with r_A = s m / 2 and
r_B = -s m / 2): logits [s m / 2, -s m / 2, log nu], s >= 0 and log nu fitted by maximum likelihood. The
calibration is fitted on the member's own training folds only: on a seeded slice of the training rows
(``dpo.calibration_fraction``, whole prompt groups) that the DPO loss never saw — margins of rows the policy
was trained on are larger than on new rows, and a calibration fitted on them would be over-confident
(``calibration_fraction: 0`` does that anyway, e.g. for tiny data). The held-out fold is not used by any
stage. s and log nu are saved with the adapter (``dpo_calibration.json``).

**Swap symmetry.** Every distinct (prompt, response) conversation of a frame is scored once, in batches
formed from the set of conversations (sorted by length, then by text), so swapping A and B scores the same
conversations in the same batches, negates m exactly, and the calibration maps -m to [P(B), P(A), P(tie)]:
the probabilities are permuted exactly. No TTA is needed (``tta`` answers from the same scores).

**Why not trl's DPOTrainer.** trl is not among this project's pins. Checked (Dec 2026): trl 1.16.0 installs
with ``--no-deps`` beside our pins and imports (torch is not among its requirements, so no CUDA build is
pulled; its floors — transformers >= 4.56.2, accelerate >= 1.10.1, datasets >= 4.7, pyarrow >= 21 — are met
by the installed versions but are above pyproject.toml's). It is not used because its trainer is a
``transformers.Trainer``: it builds its own Accelerator (accelerate keeps one state per process, and the job
has already made one with its own precision), its own data pipeline, checkpoint layout and logging, where the
family protocol hands ``fit`` the job's Accelerator, history file and Pipes ``report`` hook; and the 3-class
calibration would still be ours. The DPO loss is a few lines on top of peft; what trl would add here
(reference log-probs computed once, chat-template masking) is ``score_conversations`` and ``gpu_jobs.sft``'s
``encode_conversation``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gpu_jobs.config import DPOConfig
from gpu_jobs.contract.ties import without_tie

FAMILY_NAME = "dpo"
CALIBRATION_FILE = "dpo_calibration.json"
LOG_NU_BOUNDS = (-12.0, 6.0)  # P(tie) at m = 0 from ~1e-5 to ~0.99: no data drives log nu to infinity
SCALE_BOUNDS = (0.0, 1e3)  # s >= 0: a larger margin never makes A less likely


# ------------------------------------------------------------------------------------------ calibration
def calibrated_probs(margins: np.ndarray, scale: float, log_nu: float) -> np.ndarray:
    """(n, 3) [P(A), P(B), P(tie)] of the Davidson model on the margin: logits [s m/2, -s m/2, log nu].
    Negating m exchanges the first two logits and leaves the tie logit, so the output is permuted exactly."""
    from scipy.special import softmax

    m = np.asarray(margins, dtype=np.float64)
    half = scale * m / 2
    logits = np.stack([half, -half, np.full_like(m, log_nu)], axis=1)
    return softmax(logits, axis=1)


def fit_calibration(margins: np.ndarray, y: np.ndarray, w: np.ndarray | None = None,
                    tie_free: np.ndarray | None = None) -> dict[str, float]:
    """Maximum-likelihood (s, log nu) of ``calibrated_probs`` for margins ``m`` and (n, 3) targets ``y``
    (one-hot or soft; A, B, tie) with row weights ``w``; L-BFGS-B with the analytic gradient. Rows where
    ``tie_free`` is True could not be labelled a tie (``gpu_jobs/contract/ties.py``): they enter by the
    conditional likelihood P(y | not tie) = sigmoid(+-s m), which says nothing about log nu."""
    from scipy.optimize import minimize

    m = np.asarray(margins, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w = np.ones(len(m)) if w is None else np.asarray(w, dtype=np.float64)
    free = np.zeros(len(m), dtype=bool) if tie_free is None else np.asarray(tie_free, dtype=bool)
    if len(m) == 0 or w.sum() <= 0:
        raise ValueError("dpo calibration: no rows (with weight) to fit on")
    if not np.isfinite(m).all():
        raise ValueError(f"dpo calibration: {int((~np.isfinite(m)).sum())} margin(s) are not finite")
    w = w / w.sum()
    y_cond = without_tie(y, free)  # a tie-free row's target: A : B of its label, no tie

    def nll(theta):
        # tie-free rows are scored by P(y | not tie): without_tie renormalises their A : B (sigmoid(s m)) and
        # zeroes the tie, so d nll / d logit = q - y_cond there as on the other rows, with no tie component
        q = without_tie(np.clip(calibrated_probs(m, theta[0], theta[1]), 1e-300, None), free)
        r = q - y_cond
        grad = np.array([np.sum(w * (r[:, 0] - r[:, 1]) * m / 2), np.sum(w * r[:, 2])])
        return -np.sum(w * (y_cond * np.log(np.clip(q, 1e-300, None))).sum(axis=1)), grad

    possible = ~free
    tie = float(np.clip(np.sum(w[possible] * y[possible, 2]) / max(w[possible].sum(), 1e-300), 1e-3, 1 - 1e-3))
    start = np.array([1.0, np.clip(math.log(2 * tie / (1 - tie)), *LOG_NU_BOUNDS)])  # P(tie | m = 0) = tie rate
    res = minimize(nll, start, jac=True, method="L-BFGS-B", bounds=[SCALE_BOUNDS, LOG_NU_BOUNDS],
                   options={"maxiter": 500, "ftol": 1e-12, "gtol": 1e-9})
    return {"scale": float(res.x[0]), "log_nu": float(res.x[1]), "nll": float(res.fun), "n": int(len(m))}


def preference_targets(y: np.ndarray, w: np.ndarray, ties: str,
                       tie_free: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(t, weight) of the DPO loss per row: t = P(A preferred to B), see the module docstring. Rows where
    ``tie_free`` is True follow the ``drop`` rule under either setting: a tie they could not have had (a
    teacher's tie mass on them) is no evidence for an even margin."""
    y, w = np.asarray(y, dtype=np.float64), np.asarray(w, dtype=np.float64)
    if ties not in ("drop", "half"):
        raise ValueError(f"dpo.ties: expected 'drop' or 'half', got {ties!r}")
    decided = y[:, 0] + y[:, 1]
    drop_t = np.divide(y[:, 0], decided, out=np.full(len(y), 0.5), where=decided > 0)
    if ties == "drop":
        return drop_t, w * decided
    free = np.zeros(len(y), dtype=bool) if tie_free is None else np.asarray(tie_free, dtype=bool)
    return np.where(free, drop_t, y[:, 0] + y[:, 2] / 2), np.where(free, w * decided, w)


def calibration_split(frame: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the rows kept out of the DPO loss for the calibration: whole prompt groups (the
    ``group`` column where present, else the normalised first prompt turn), a seeded ``fraction`` of them."""
    if fraction <= 0:
        return np.zeros(len(frame), dtype=bool)
    if "group" in frame.columns:
        keys = frame["group"].astype(str).to_numpy()
    else:
        from gpu_jobs.models.reward_model import prompt_key

        keys = np.array([prompt_key(c) for c in frame["prompt"].tolist()], dtype=object)
    groups = np.unique(keys)
    rng = np.random.default_rng(seed)
    n_cal = min(len(groups) - 1, max(1, round(fraction * len(groups))))  # at least one group on each side
    if n_cal < 1:
        raise ValueError(f"dpo.calibration_fraction {fraction}: the training rows hold a single prompt group; "
                         "nothing is left to train on once the calibration slice is taken (set it to 0)")
    return np.isin(keys, rng.choice(groups, size=n_cal, replace=False))


# ------------------------------------------------------------------------------------------ text
def conversation_key(prompt_cell, response_cell) -> tuple[str, str]:
    return (str(prompt_cell), str(response_cell))


def frame_conversations(frame: pd.DataFrame) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The (prompt, response) conversation of side A and of side B of every row."""
    prompts = frame["prompt"].tolist()
    return ([conversation_key(p, r) for p, r in zip(prompts, frame["response_a"].tolist())],
            [conversation_key(p, r) for p, r in zip(prompts, frame["response_b"].tolist())])


def encode(tokenizer, key: tuple[str, str], max_length: int, max_chars: int) -> dict:
    """(input_ids, labels) of one conversation in the chat template, loss on the assistant tokens only."""
    from gpu_jobs.sft import encode_conversation, messages_of

    messages = [{**msg, "content": msg["content"][:max_chars]} for msg in messages_of(*key)]
    ids, labels = encode_conversation(tokenizer, messages, max_length)
    return {"input_ids": ids, "labels": labels}


def _max_chars(cfg, max_length: int) -> int:
    return cfg.text.max_chars_per_part or 12 * max_length  # a longer turn cannot fit anyway


def sequence_logps(model, batch: dict, device):
    """(rows,) float32: the sum of log pi(token) over each row's assistant tokens (labels != IGNORE). The
    vocabulary projection runs only at the positions that predict an answer token in some row of the batch
    (``logits_to_keep``), not over the system and user text."""
    import torch

    from gpu_jobs.sft import IGNORE

    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = (labels != IGNORE).any(dim=0).nonzero().squeeze(-1)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   logits_to_keep=keep.to(device)).logits  # (rows, kept positions, vocab)
    labels = labels[:, keep].to(device)
    mask = labels != IGNORE
    token_lp = torch.log_softmax(logits[mask].float(), dim=-1).gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(labels.shape[0], device=device).unsqueeze(1).expand_as(labels)[mask]
    return torch.zeros(labels.shape[0], device=device, dtype=torch.float32).index_add(0, rows, token_lp)


def score_conversations(model, tokenizer, keys: list[tuple[str, str]], max_length: int, max_chars: int,
                        batch_size: int, device, autocast, accelerator=None, policy: bool = True,
                        progress: bool = False, encoded: dict | None = None) -> dict[tuple[str, str], tuple[float, float]]:
    """{conversation: (log pi, log pi_ref)} for every distinct conversation in ``keys`` (log pi is NaN when
    ``policy`` is False), on every process. Batches are cut from the conversations sorted by (length, text), so
    the same set of conversations is always scored in the same batches; with several processes each one
    scores every n-th batch and the pieces are gathered. ``encoded``: conversations already encoded with
    these ``max_length`` / ``max_chars`` (the training pairs), reused."""
    import torch

    from gpu_jobs.sft import collate

    unique = sorted(set(keys))
    encoded = encoded or {}
    examples = [encoded[k] if k in encoded else encode(tokenizer, k, max_length, max_chars) for k in unique]
    order = sorted(range(len(unique)), key=lambda i: (-len(examples[i]["input_ids"]), unique[i]))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    n_proc = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    mine = batches[rank::n_proc]
    if progress and rank == 0:
        from tqdm.auto import tqdm

        mine = tqdm(mine, desc="dpo score", leave=False)
    pieces: list[tuple[list[int], list[float], list[float]]] = []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for rows in mine:
            batch = collate([examples[i] for i in rows], tokenizer.pad_token_id)
            with autocast():
                lp = sequence_logps(model, batch, device).cpu().tolist() if policy else [math.nan] * len(rows)
                with model.disable_adapter():
                    ref = sequence_logps(model, batch, device).cpu().tolist()
            pieces.append((rows, lp, ref))
    model.train(was_training)
    if n_proc > 1:
        from accelerate.utils import gather_object

        pieces = gather_object(pieces)
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for rows, lp, ref in pieces:
        for i, a, b in zip(rows, lp, ref):
            out[unique[i]] = (a, b)
    if len(out) != len(unique):
        raise RuntimeError(f"dpo scoring covered {len(out)} of {len(unique)} conversations")
    return out


def margins_of(scores: dict, side_a: list, side_b: list, beta: float) -> np.ndarray:
    """m = beta * [(log pi - log pi_ref)(A) - (log pi - log pi_ref)(B)] per row."""
    ratio = {k: lp - ref for k, (lp, ref) in scores.items()}
    return beta * np.array([ratio[a] - ratio[b] for a, b in zip(side_a, side_b)], dtype=np.float64)


# ------------------------------------------------------------------------------------------ model
@dataclass
class DPOModel:
    """The trained member: the LoRA policy (peft; reference = adapter disabled) and its calibration."""

    policy: Any
    calibration: dict = field(default_factory=dict)

    def eval(self):
        self.policy.eval()
        return self


def build(cfg, device=None):
    """(peft causal LM with a fresh LoRA adapter, tokenizer)."""
    from gpu_jobs.models import llm_classifier as L
    from gpu_jobs.models.loading import resolve_model

    path = resolve_model(cfg.model_name)
    tokenizer = L.load_tokenizer(path)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{cfg.name}: model_name {cfg.model_name!r} has no chat template; the dpo family reads "
                         "each side as a chat conversation (use an instruct / chat checkpoint)")
    base = L._base_model(cfg, path, tokenizer, device, causal_lm=True)
    return L.wrap_lora(base, cfg, "CAUSAL_LM"), tokenizer


def _log(log, message: str) -> None:
    if log is not None:
        log.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


class DPOFamily:
    """The ``dpo`` family behind the registry protocol (its own loop: a pair is two conversations, the loss
    needs reference log-probabilities, and the output needs a calibration fitted after training)."""

    name = FAMILY_NAME
    config_class = DPOConfig
    neural = True
    kinds = frozenset({"pytorch"})
    # gpu_jobs.quantize leaves it as trained: the reference is the same weights with the adapter switched off,
    # so the adapter cannot be merged into a quantised copy
    quantizable = False
    quantizable_reason = "the reference model is the base with the LoRA adapter switched off"

    # -------------------------------------------------------------------------------------- fit
    def fit(self, cfg, train_df, y, w, accelerator, history_path=None, checkpointer=None, log=None, report=None,
            held_out=None, stop_file=None):
        """DPO on the training rows (minus the calibration slice), then the calibration; ``held_out`` (the
        validation fold) is never read. Once ``stop_file`` exists (HPO pruning) every process stops after the
        current step, and the calibration is fitted on the policy as it is. Returns (DPOModel, tokenizer, stats)."""
        import torch
        import torch.nn.functional as F
        from transformers import get_scheduler

        from gpu_jobs import inputs as D
        from gpu_jobs.sft import collate
        from gpu_jobs.train import make_optimizer

        t, d = cfg.training, cfg.dpo
        device = accelerator.device
        model, tokenizer = build(cfg, device)
        max_chars = _max_chars(cfg, t.max_length)

        calib = calibration_split(train_df, d.calibration_fraction, cfg.seed)
        tie_free = ~D.ties_possible(train_df, "the training rows")
        target, weight = preference_targets(y, w, d.ties, tie_free)
        use = ~calib & (weight > 0)
        if not use.any():
            raise ValueError(f"{cfg.name}: no training row is left for the DPO loss ({int(calib.sum())} rows in the "
                             f"calibration slice, {int((weight <= 0).sum())} ties or zero-weight rows)")
        pairs = train_df[use].reset_index(drop=True)
        target_t = torch.tensor(target[use], dtype=torch.float32)
        weight_t = torch.tensor(weight[use], dtype=torch.float32)
        side_a, side_b = frame_conversations(pairs)
        examples = {k: encode(tokenizer, k, t.max_length, max_chars) for k in set(side_a) | set(side_b)}

        # reference log-probabilities, once (adapter off, no dropout)
        t_ref = time.perf_counter()
        ref = score_conversations(model, tokenizer, side_a + side_b, t.max_length, max_chars,
                                  cfg.inference.batch_size, device, accelerator.autocast, accelerator,
                                  policy=False, progress=accelerator.is_local_main_process, encoded=examples)
        ref_a = torch.tensor([ref[k][1] for k in side_a], dtype=torch.float32)
        ref_b = torch.tensor([ref[k][1] for k in side_b], dtype=torch.float32)
        ref_s = time.perf_counter() - t_ref
        _log(log, f"{cfg.name}: {len(pairs)} DPO pairs ({int(calib.sum())} rows kept for the calibration, "
                  f"{int(((weight <= 0) & ~calib).sum())} ties / zero-weight rows left out of the loss, "
                  f"ties: {d.ties}); reference log-probs of {len(ref)} conversations in {ref_s:.1f} s")

        lengths = [max(len(examples[a]["input_ids"]), len(examples[b]["input_ids"])) for a, b in zip(side_a, side_b)]
        sampler = (D.LengthGroupedBatchSampler if t.group_by_length else D.RandomBatchSampler)(
            lengths, t.batch_size, seed=cfg.seed)
        n_proc, rank = accelerator.num_processes, accelerator.process_index
        per_rank = len(sampler) // n_proc  # every process takes the same number of batches (DDP)
        if per_rank == 0:
            raise ValueError(f"{cfg.name}: {len(pairs)} pairs make {len(sampler)} batches of {t.batch_size}, fewer "
                             f"than the {n_proc} processes")
        steps_per_epoch = math.ceil(per_rank / t.grad_accum)  # the last group of an epoch may be short
        total_steps = steps_per_epoch * t.epochs
        optimizer = make_optimizer(model, cfg, ())
        scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=t.warmup_steps,
                                  num_training_steps=total_steps)
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(scheduler)  # saved and restored with the checkpoints

        from tqdm.auto import tqdm

        from gpu_jobs.checkpoint import fresh_start, restore_rng, stop_requested

        r = checkpointer.resume(model, history_path, log, per_rank) if checkpointer is not None else fresh_start()
        if r["rng"] is not None:  # the batch order is seeded per epoch (numpy); the global RNGs drive dropout
            restore_rng(r["rng"])
        step, seen, step_losses, prior_train_s = r["step"], r["seen"], r["losses"], r["train_s"]
        history = open(history_path, "a" if step else "w") if history_path is not None else None
        bar = tqdm(total=total_steps, initial=step, desc=f"dpo {cfg.name}",
                   disable=not accelerator.is_local_main_process)
        micro, t0, stopped_at = [], time.perf_counter(), None
        model.train()
        for epoch in range(r["epoch"], t.epochs):
            sampler.set_epoch(epoch)
            mine = sampler.batches()[rank::n_proc][:per_rank]
            skip = r["batch_in_epoch"] if epoch == r["epoch"] else 0  # done before the checkpoint
            for index, rows in enumerate(mine):
                if index < skip:
                    continue
                # one optimiser step per grad_accum batches (and at the end of the epoch); gradients are
                # synchronised across processes at that batch only
                sync = (index + 1) % t.grad_accum == 0 or index + 1 == len(mine)
                batch = collate([examples[side_a[i]] for i in rows] + [examples[side_b[i]] for i in rows],
                                tokenizer.pad_token_id)
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    with accelerator.autocast():
                        lp = sequence_logps(model, batch, device)
                    k = len(rows)
                    h = d.beta * ((lp[:k] - ref_a[rows].to(device)) - (lp[k:] - ref_b[rows].to(device)))
                    wt = weight_t[rows].to(device)
                    loss = (F.binary_cross_entropy_with_logits(h, target_t[rows].to(device), reduction="none")
                            * wt).sum() / wt.sum().clamp_min(1e-12)
                    accelerator.backward(loss)  # divided by grad_accum
                side = target_t[rows].to(device) - 0.5  # > 0: A preferred, < 0: B, 0: a tie (no side)
                right = (h.detach() * side > 0)[side != 0].float()  # the margin points at the preferred side
                micro.append(torch.stack([loss.detach().float(), h.detach().mean(),
                                          right.mean() if len(right) else torch.tensor(float("nan"), device=device)]))
                seen += k
                if not sync:
                    continue
                accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                step_loss, margin, accuracy = accelerator.reduce(torch.stack(micro).nanmean(0),
                                                                 reduction="mean").tolist()
                micro = []
                step_losses.append(step_loss)
                lr = scheduler.get_last_lr()[0]
                row = {"step": step, "epoch": epoch, "loss": step_loss, "lr": lr, "reward_margin": margin,
                       "reward_accuracy": None if math.isnan(accuracy) else accuracy,  # None: only ties
                       "elapsed_s": round(prior_train_s + time.perf_counter() - t0, 4)}
                if history is not None:
                    history.write(json.dumps(row) + "\n")
                    history.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", margin=f"{margin:.3f}")
                if report is not None and accelerator.is_main_process:
                    report({"kind": "step", **{k_: v for k_, v in row.items() if k_ != "elapsed_s"},
                            "examples_per_s": seen / max(prior_train_s + time.perf_counter() - t0, 1e-9)})
                if checkpointer is not None and step % checkpointer.every == 0:
                    checkpointer.save(step, epoch, index + 1, seen, prior_train_s + time.perf_counter() - t0,
                                      history_path)
                if stop_requested(accelerator, stop_file):
                    stopped_at = step
                    break
            if stopped_at is not None:
                _log(log, f"{cfg.name}: stopped at step {step} ({stop_file} appeared)")
                break
        train_s = prior_train_s + time.perf_counter() - t0
        bar.close()
        if history is not None:
            history.close()
        if checkpointer is not None:
            checkpointer.close()
        model = accelerator.unwrap_model(model)
        model.eval()

        # calibration on the slice the loss never saw (or on the training rows when the fraction is 0)
        calib_df = train_df[calib].reset_index(drop=True) if calib.any() else train_df
        calib_y, calib_w, calib_free = (y[calib], w[calib], tie_free[calib]) if calib.any() else (y, w, tie_free)
        cal_a, cal_b = frame_conversations(calib_df)
        scores = score_conversations(model, tokenizer, cal_a + cal_b, cfg.inference.max_length,
                                     _max_chars(cfg, cfg.inference.max_length), cfg.inference.batch_size, device,
                                     accelerator.autocast, accelerator, progress=accelerator.is_local_main_process)
        m = margins_of(scores, cal_a, cal_b, d.beta)
        calibration = {**fit_calibration(m, calib_y, calib_w, calib_free), "beta": d.beta,
                       "fitted_on": "calibration_slice" if calib.any() else "training_rows"}
        side = np.sign(np.asarray(calib_y)[:, 0] - np.asarray(calib_y)[:, 1])
        decided, agree = side != 0, m * side > 0  # a zero margin points at neither side
        metrics = {"dpo_pairs": len(pairs), "dpo_calibration_rows": len(calib_df),
                   "dpo_calibration_fitted_on": calibration["fitted_on"],
                   "dpo_calibration_scale": calibration["scale"], "dpo_calibration_log_nu": calibration["log_nu"],
                   "dpo_calibration_nll": calibration["nll"], "dpo_reference_s": ref_s,
                   "dpo_calibration_reward_accuracy": float(agree[decided].mean()) if decided.any() else None}
        _log(log, f"{cfg.name}: {step} DPO steps in {train_s:.1f} s, loss {step_losses[0]:.4f} -> "
                  f"{step_losses[-1]:.4f}; calibration on {len(calib_df)} rows ({calibration['fitted_on']}): "
                  f"s {calibration['scale']:.3f}, log nu {calibration['log_nu']:.3f}, reward accuracy "
                  f"{metrics['dpo_calibration_reward_accuracy']}")
        seen_all = int(accelerator.reduce(torch.tensor(seen, device=device), reduction="sum").item())
        stats = {"train_examples_per_s": seen_all / max(train_s, 1e-9), "train_s": train_s, "n_steps": step,
                 "resumed_from_step": r["step"], "first_train_loss": step_losses[0],
                 "final_train_loss": float(np.mean(step_losses[-max(1, len(step_losses) // 10):])),
                 "metrics": metrics, **({"stopped_early_at_step": stopped_at} if stopped_at is not None else {})}
        return DPOModel(model, calibration), tokenizer, stats

    # -------------------------------------------------------------------------------------- save / load
    def save(self, model: DPOModel, tokenizer, model_dir) -> None:
        """The LoRA adapter (peft), the tokenizer and ``dpo_calibration.json``."""
        from gpu_jobs.contract.atomic import atomic_write_json

        model_dir = Path(model_dir)
        model.policy.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        atomic_write_json(model.calibration, model_dir / CALIBRATION_FILE, indent=2)

    def load(self, model_dir, cfg, device=None):
        """Base from ``cfg.model_name`` + the saved adapter (not merged: the reference is the adapter
        switched off) + the calibration, in eval mode."""
        from peft import PeftModel

        from gpu_jobs.models import llm_classifier as L
        from gpu_jobs.models.loading import resolve_model
        from gpu_jobs.models.neural import default_device

        model_dir = Path(model_dir)
        path = model_dir / CALIBRATION_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found; {model_dir} is not a complete dpo model directory")
        calibration = json.loads(path.read_text())
        missing = [k for k in ("scale", "log_nu", "beta") if not isinstance(calibration.get(k), (int, float))]
        if missing:
            raise ValueError(f"{path}: field(s) {missing} missing or not numbers")
        device = device or default_device()
        tokenizer = L.load_tokenizer(model_dir)
        base = L._base_model(cfg, resolve_model(cfg.model_name), tokenizer, device, causal_lm=True)
        policy = PeftModel.from_pretrained(base, model_dir)
        if not cfg.quantization.load_in_4bit:
            policy.to(device)
        return DPOModel(policy, calibration).eval(), tokenizer

    # -------------------------------------------------------------------------------------- predict
    def predict(self, cfg, model: DPOModel, tokenizer, frame, tta=False, batch_size=None, max_length=None,
                device=None, accelerator=None, progress=False, precision=None):
        """Calibrated [P(A), P(B), P(tie)] from the implicit reward margins; ``tta`` gives the swapped pairs'
        probabilities permuted back, from the same conversation scores (equal by construction)."""
        from gpu_jobs.contract.swap import SWAP_PERMUTATION
        from gpu_jobs.models.neural import _autocast, default_device
        from gpu_jobs.precision import resolve

        device = device or (accelerator.device if accelerator is not None else default_device())
        max_length = max_length or cfg.inference.max_length
        precision = resolve(precision or cfg.precision, device.type)
        if len(frame) == 0:
            return np.zeros((0, 3)), (np.zeros((0, 3)) if tta else None)
        side_a, side_b = frame_conversations(frame)
        scores = score_conversations(model.policy, tokenizer, side_a + side_b, max_length,
                                     _max_chars(cfg, max_length), batch_size or cfg.inference.batch_size, device,
                                     lambda: _autocast(device, precision), accelerator, progress=progress)
        cal = model.calibration
        probs = calibrated_probs(margins_of(scores, side_a, side_b, cal["beta"]), cal["scale"], cal["log_nu"])
        probs_tta = None
        if tta:
            swapped = calibrated_probs(margins_of(scores, side_b, side_a, cal["beta"]), cal["scale"], cal["log_nu"])
            probs_tta = swapped[:, SWAP_PERMUTATION]
        return probs, probs_tta


FAMILY = DPOFamily()
