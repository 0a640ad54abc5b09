"""Bi-encoder (siamese): one shared encoder embeds (prompt, response A) as u and (prompt, response B) as v.

The head is swap-equivariant by construction:

    logit_A   = f([u, v, u - v, u * v])
    logit_B   = f([v, u, v - u, v * u])      (the same f, the sides exchanged)
    logit_tie = g([|u - v|, u * v, u + v])   (features symmetric in u and v)

so swapping A and B exchanges logit_A and logit_B and leaves logit_tie unchanged: the probabilities are
permuted exactly (no TTA needed). f and g are one-hidden-layer MLPs (``head_hidden`` units, GELU); the network
is ``gpu_jobs.models.pairwise.BiEncoder``.
"""

from __future__ import annotations

from gpu_jobs.config import BiEncoderConfig
from gpu_jobs.models.neural import siamese_family

HEAD_NAMES = ("win_head", "tie_head")


def _make(encoder, cfg):
    from gpu_jobs.models.pairwise import BiEncoder

    return BiEncoder(encoder, cfg.pooling, cfg.head_hidden, cfg.head_dropout)


FAMILY = siamese_family("bi_encoder", BiEncoderConfig, _make, HEAD_NAMES)
# build(cfg, device=None) -> (model, tokenizer); save(model, tokenizer, model_dir); load(model_dir, cfg, device=None)
build, save, load = FAMILY.build, FAMILY.save_fn, FAMILY.load_fn
