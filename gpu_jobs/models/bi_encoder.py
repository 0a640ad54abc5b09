"""Bi-encoder (siamese): one shared encoder embeds (prompt, response A) as u and (prompt, response B) as v.

The head is swap-equivariant by construction:

    logit_A   = f([u, v, u - v, u * v])
    logit_B   = f([v, u, v - u, v * u])      (the same f, the sides exchanged)
    logit_tie = g([|u - v|, u * v, u + v])   (features symmetric in u and v)

so swapping A and B exchanges logit_A and logit_B and leaves logit_tie unchanged: the probabilities are
permuted exactly (no TTA needed). f and g are one-hidden-layer MLPs (``head_hidden`` units, GELU).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gpu_jobs.models import pairwise
from gpu_jobs.models.pairwise import Collator, encode_frame, row_length  # noqa: F401  (the job's hooks)

HEAD_NAMES = ("win_head", "tie_head")


def _mlp(n_in: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(n_in, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, 1))


class BiEncoder(pairwise.SiameseModel):
    def __init__(self, encoder, pooling: str = "mean", head_hidden: int = 256, head_dropout: float = 0.1):
        super().__init__(encoder, pooling)
        h = self.hidden_size
        self.win_head = _mlp(4 * h, head_hidden, head_dropout)
        self.tie_head = _mlp(3 * h, head_hidden, head_dropout)

    def head_logits(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        prod = u * v
        logit_a = self.win_head(torch.cat([u, v, u - v, prod], dim=-1))
        logit_b = self.win_head(torch.cat([v, u, v - u, prod], dim=-1))
        logit_tie = self.tie_head(torch.cat([(u - v).abs(), prod, u + v], dim=-1))
        return torch.cat([logit_a, logit_b, logit_tie], dim=-1)


def _make(encoder, cfg) -> BiEncoder:
    return BiEncoder(encoder, cfg.pooling, cfg.head_hidden, cfg.head_dropout)


def build(cfg, device=None):
    """Pretrained encoder + fresh swap-equivariant head, and the tokenizer (for training)."""
    return pairwise.build(cfg, _make)


def save(model, tokenizer, model_dir: Path) -> None:
    pairwise.save(model, tokenizer, model_dir)


def load(model_dir: Path, cfg, device=None):
    """The trained bi-encoder from a model directory, in eval mode."""
    return pairwise.load(model_dir, cfg, _make)
