"""Reward model: a scalar reward r(prompt, response) from a shared encoder, and a Davidson tie term.

Each side is read on its own (``gpu_jobs.models.pairwise``, which also holds the network, ``RewardModel``): r_A = r(prompt, A), r_B = r(prompt, B). The three
classes follow Bradley-Terry with ties (Davidson 1970):

    P(A) ∝ exp(r_A),   P(B) ∝ exp(r_B),   P(tie) ∝ ν · exp((r_A + r_B) / 2),   ν = exp(log_nu) (learned)

so the logits are ``[r_A, r_B, log_nu + (r_A + r_B) / 2]`` and the job's soft cross-entropy trains them on
the 3-way labels (soft targets where the data has them). Swapping A and B swaps r_A and r_B and leaves the
tie logit unchanged: the probabilities are permuted exactly, by construction (no TTA needed).

Optional pre-training (``pretrain:`` in the config), run by the job before fine-tuning: every within-prompt
pair of two answers of an answers table (``arena_bench_answers``: ~15 graded answers per question, ~30k
pairs), with the soft target P(first beats second) = sigmoid((score_1 - score_2) / score_scale) from the
judge scores, trained with a Bradley-Terry loss on r_1 - r_2 (binary cross-entropy with that soft target;
the tie parameter is left to fine-tuning). Fold discipline: no answer to a prompt of the held-out rows
(the validation fold) is used — matched on the question id where both tables have one and on the
normalised first prompt turn.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import pandas as pd

from gpu_jobs.config import RewardModelConfig
from gpu_jobs.contract.turns import parse_turns
from gpu_jobs.models.neural import siamese_family

HEAD_NAMES = ("reward_head", "log_nu")


def _make(encoder, cfg):
    from gpu_jobs.models.pairwise import RewardModel

    return RewardModel(encoder, cfg.pooling, cfg.tie_log_nu_init)


# ------------------------------------------------------------------------------------------ pre-training
def prompt_key(cell) -> str:
    """The first prompt turn, case-folded, whitespace collapsed: how answers are matched to held-out rows."""
    turns = parse_turns(cell)
    return " ".join((turns[0] if turns else "").split()).casefold()


def answer_pairs(answers: pd.DataFrame, held_out: pd.DataFrame | None, score_scale: float = 1.0,
                 max_pairs: int | None = None, seed: int = 42) -> tuple[pd.DataFrame, int]:
    """Every within-question pair of two different answers, minus the questions of ``held_out``.

    Returns (pairs with prompt, response_a, response_b, target_a = sigmoid(score gap / scale); the number of
    answers dropped for fold discipline). Which answer is A is drawn at random (seeded)."""
    need = ["question_id", "prompt", "response", "judge_score"]
    missing = [c for c in need if c not in answers.columns]
    if missing:
        raise ValueError(f"pretrain.data: missing column(s) {missing}; an answers table needs {need}")
    answers = answers.dropna(subset=["judge_score"]).reset_index(drop=True)
    keep = np.ones(len(answers), dtype=bool)
    if held_out is not None and len(held_out):
        banned = {prompt_key(c) for c in held_out["prompt"].tolist()}
        keep &= ~np.array([prompt_key(c) in banned for c in answers["prompt"].tolist()])
        if "question_id" in held_out.columns:
            keep &= ~answers["question_id"].isin(set(held_out["question_id"].dropna())).to_numpy()
    dropped = int((~keep).sum())
    answers = answers[keep].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    first, second = [], []
    for _, idx in answers.groupby("question_id", sort=True).indices.items():
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                if answers["response"].iat[idx[a]] != answers["response"].iat[idx[b]]:
                    first.append(idx[a])
                    second.append(idx[b])
    first, second = np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)
    flip = rng.random(len(first)) < 0.5
    first, second = np.where(flip, second, first), np.where(flip, first, second)
    if max_pairs is not None and len(first) > max_pairs:
        pick = np.sort(rng.choice(len(first), size=max_pairs, replace=False))
        first, second = first[pick], second[pick]
    score = answers["judge_score"].to_numpy(dtype=np.float64)
    gap = (score[first] - score[second]) / score_scale
    pairs = pd.DataFrame({
        "prompt": answers["prompt"].to_numpy()[first],
        "response_a": answers["response"].to_numpy()[first],
        "response_b": answers["response"].to_numpy()[second],
        "target_a": 1.0 / (1.0 + np.exp(-gap)),
    })
    return pairs, dropped


def pretrain(cfg, model, tokenizer, accelerator, held_out: pd.DataFrame | None, log=None) -> dict:
    """The pre-training stage, in place on ``model`` (a ``pairwise.RewardModel``, before the fine-tuning loop
    prepares it); nothing (``{}``) without a ``pretrain:`` section. Every process runs the same seeded stage
    (DDP then broadcasts rank 0's weights). Returns its metrics."""
    if cfg.pretrain is None:
        return {}
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    from gpu_jobs import inputs as D
    from gpu_jobs.models.pairwise import Collator, encode_frame, row_length
    from gpu_jobs.train import make_optimizer

    p, t = cfg.pretrain, cfg.training
    answers = pd.read_parquet(p.data)
    pairs, dropped = answer_pairs(answers, held_out, p.score_scale, p.max_pairs, cfg.seed)
    if len(pairs) == 0:
        raise ValueError(f"pretrain.data {p.data}: no answer pairs left after dropping the held-out prompts")
    max_length, batch_size = p.max_length or t.max_length, p.batch_size or t.batch_size
    ids = encode_frame(pairs, tokenizer, max_length, cfg.text.truncation_side,
                       max_chars_per_part=cfg.text.max_chars_per_part)
    soft = pairs["target_a"].to_numpy(dtype=np.float32)
    targets = np.stack([soft, 1 - soft, np.zeros_like(soft)], axis=1)  # the collator's layout; only A is used
    sampler = D.LengthGroupedBatchSampler([row_length(x) for x in ids], batch_size, seed=cfg.seed)
    pad_multiple = 8 if accelerator.device.type == "cuda" else None
    loader = DataLoader(D.PairsDataset(ids, targets), batch_sampler=sampler,
                        collate_fn=Collator(tokenizer.pad_token_id, pad_multiple))
    lr_cfg = cfg.model_copy(update={"training": t.model_copy(update={"lr": p.lr or t.lr})})
    optimizer = make_optimizer(model, lr_cfg, HEAD_NAMES)
    steps = len(loader) * p.epochs
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=p.warmup_steps, num_training_steps=steps)
    model.to(accelerator.device).train()
    losses, seen, t0 = [], 0, time.perf_counter()
    for epoch in range(p.epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            with accelerator.autocast():
                r = model.rewards(batch["input_ids"].to(accelerator.device),
                                  batch["attention_mask"].to(accelerator.device))
            loss = F.binary_cross_entropy_with_logits((r[:, 0] - r[:, 1]).float(),
                                                      batch["targets"][:, 0].to(accelerator.device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            seen += batch["input_ids"].shape[0]
    pretrain_s = time.perf_counter() - t0
    tail = max(1, len(losses) // 10)
    stats = {"pretrain_pairs": len(pairs), "pretrain_answers_dropped": dropped, "pretrain_steps": len(losses),
             "pretrain_s": pretrain_s, "pretrain_examples_per_s": seen / max(pretrain_s, 1e-9),
             "pretrain_first_loss": losses[0], "pretrain_final_loss": float(np.mean(losses[-tail:]))}
    message = (f"{cfg.name}: pre-trained on {len(pairs)} answer pairs ({dropped} answers to held-out prompts "
               f"dropped), {len(losses)} steps in {pretrain_s:.1f} s, loss {losses[0]:.4f} -> "
               f"{stats['pretrain_final_loss']:.4f}")
    if log is not None:
        log.info(message)
    else:
        print(message, file=sys.stderr, flush=True)
    assert math.isfinite(stats["pretrain_final_loss"]), stats
    return stats


FAMILY = siamese_family("reward_model", RewardModelConfig, _make, HEAD_NAMES, pretrain_fn=pretrain)
# build(cfg, device=None) -> (model, tokenizer); save(model, tokenizer, model_dir); load(model_dir, cfg, device=None)
build, save, load = FAMILY.build, FAMILY.save_fn, FAMILY.load_fn
