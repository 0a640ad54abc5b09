"""Reward model: a scalar reward r(prompt, response) from a shared encoder, and a Davidson tie term.

Each side is read on its own (``gpu_jobs.models.pairwise``): r_A = r(prompt, A), r_B = r(prompt, B). The three
classes follow Bradley-Terry with ties (Davidson 1970):

    P(A) ∝ exp(r_A),   P(B) ∝ exp(r_B),   P(tie) ∝ ν · exp((r_A + r_B) / 2),   ν = exp(log_nu) (learned)

so the logits are ``[r_A, r_B, log_nu + (r_A + r_B) / 2]`` and the job's soft cross-entropy trains them on
the 3-way labels (soft targets where the data has them). Swapping A and B swaps r_A and r_B and leaves the
tie logit unchanged: the probabilities are permuted exactly, by construction (no TTA needed).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gpu_jobs.models import pairwise
from gpu_jobs.models.pairwise import Collator, encode_frame, row_length  # noqa: F401  (the job's hooks)

HEAD_NAMES = ("reward_head", "log_nu")


class RewardModel(pairwise.SiameseModel):
    def __init__(self, encoder, pooling: str = "mean", tie_log_nu: float = 0.0):
        super().__init__(encoder, pooling)
        self.reward_head = nn.Linear(self.hidden_size, 1)
        self.log_nu = nn.Parameter(torch.tensor(float(tie_log_nu)))

    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(rows, 2): r_A, r_B."""
        u, v = self.embed(input_ids, attention_mask)
        return torch.cat([self.reward_head(u), self.reward_head(v)], dim=1)

    def head_logits(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return davidson_logits(self.reward_head(u).squeeze(-1), self.reward_head(v).squeeze(-1), self.log_nu)


def davidson_logits(r_a: torch.Tensor, r_b: torch.Tensor, log_nu: torch.Tensor) -> torch.Tensor:
    """(rows, 3) logits whose softmax is the Davidson model's P(A), P(B), P(tie)."""
    return torch.stack([r_a, r_b, log_nu + (r_a + r_b) / 2], dim=-1)


def _make(encoder, cfg) -> RewardModel:
    return RewardModel(encoder, cfg.pooling, cfg.tie_log_nu_init)


def build(cfg, device=None):
    """Pretrained encoder + fresh reward head and tie parameter, and the tokenizer (for training)."""
    return pairwise.build(cfg, _make)


def save(model, tokenizer, model_dir: Path) -> None:
    pairwise.save(model, tokenizer, model_dir)


def load(model_dir: Path, cfg, device=None):
    """The trained reward model from a model directory, in eval mode."""
    return pairwise.load(model_dir, cfg, _make)
