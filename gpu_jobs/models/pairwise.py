"""What the two siamese families (``reward_model``, ``bi_encoder``) share: each side read on its own, and
their networks (kept here, with the ``torch`` / ``transformers`` imports, so that the family modules stay
light: profiles import them when the Dagster definitions load).

A row becomes two token sequences, (prompt, response A) and (prompt, response B), tagged alike
(``<PROMPT>p</PROMPT><RESPONSE>r</RESPONSE>`` per turn, the same tags for both sides, so the encoder cannot
tell which side it reads) and trimmed to the token budget by ``gpu_jobs.inputs.format_ids`` (same turn-dropping
rules as the cross-encoder). A batch is ``input_ids`` / ``attention_mask`` of shape (rows, 2, width); the
model runs one shared encoder on the 2 x rows sequences and pools each to a vector.

The families hand ``encode_frame``, ``Collator`` and ``row_length`` to the shared loop and prediction as their
``RowIO`` (``gpu_jobs.models.neural.siamese_io``; the cross-encoder uses ``gpu_jobs.inputs``'s).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from gpu_jobs import inputs as D
from gpu_jobs.config import POOLINGS
from gpu_jobs.models.cross_encoder import DROPOUT_KEYS
from gpu_jobs.models.loading import resolve_model

SIDE_TAGS = ("<PROMPT>", "</PROMPT>", "<RESPONSE>", "</RESPONSE>")
HEAD_FILE = "head.safetensors"


# ------------------------------------------------------------------------------------------ text
def encode_frame(frame: pd.DataFrame, tokenizer, max_length: int, truncation_side: str = "left",
                 swap: bool = False, max_chars_per_part: int = 0) -> list[tuple[list[int], list[int]]]:
    """(ids of prompt + response A, ids of prompt + response B) per row, each at most ``max_length`` long
    (tokenizer specials included); ``swap`` exchanges the two sides."""
    prefix, suffix = D._special_wrap(tokenizer)
    budget = max_length - len(prefix) - len(suffix)
    if budget < 16:
        raise ValueError(f"max_length {max_length} leaves no room for text")
    # format_ids wants six tags (prompt, A, B): the third part is always empty here, and so are its tags
    tags = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in SIDE_TAGS] + [[], []]
    max_chars = max_chars_per_part or 12 * max_length
    per_col = D.tokenize_turns(frame, tokenizer, ("prompt", "response_a", "response_b"), max_chars)

    def side(prompt, response):
        return prefix + D.format_ids(prompt, response, [], tags, budget, truncation_side) + suffix

    out = [(side(p, a), side(p, b)) for p, a, b in zip(*per_col)]
    return [(b, a) for a, b in out] if swap else out


def row_length(row: tuple[list[int], list[int]]) -> int:
    """Padded width of a row (both sides share it): batches are grouped and sorted by this."""
    return max(len(row[0]), len(row[1]))


class Collator:
    """Pads both sides of every row of a batch to one width: (rows, 2, width) ids and mask."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.flat = D.Collator(pad_token_id, pad_to_multiple_of)

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        n = len(items)
        flat = self.flat([{"input_ids": side, "index": it["index"]} for it in items for side in it["input_ids"]])
        batch = {"input_ids": flat["input_ids"].view(n, 2, -1), "attention_mask": flat["attention_mask"].view(n, 2, -1),
                 "index": torch.as_tensor([it["index"] for it in items], dtype=torch.long)}
        if "targets" in items[0]:
            batch["targets"] = torch.stack([torch.as_tensor(it["targets"], dtype=torch.float32) for it in items])
            batch["weight"] = torch.as_tensor([it["weight"] for it in items], dtype=torch.float32)
        return batch


# ------------------------------------------------------------------------------------------ model
class SiameseModel(nn.Module):
    """A shared encoder that pools each side to one vector; subclasses add ``head_logits(u, v)``."""

    def __init__(self, encoder, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.encoder, self.pooling = encoder, pooling

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, v): the pooled vectors (rows, hidden) of side A and side B, in float32."""
        rows, width = input_ids.shape[0], input_ids.shape[-1]
        mask = attention_mask.reshape(rows * 2, width)
        hidden = self.encoder(input_ids=input_ids.reshape(rows * 2, width), attention_mask=mask).last_hidden_state
        hidden = hidden.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        pooled = pooled.view(rows, 2, -1)
        return pooled[:, 0], pooled[:, 1]

    def head_logits(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        from transformers.modeling_outputs import SequenceClassifierOutput

        u, v = self.embed(input_ids, attention_mask)
        return SequenceClassifierOutput(logits=self.head_logits(u, v))

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}


class RewardModel(SiameseModel):
    """The ``reward_model`` family's network: a scalar reward per side and a Davidson tie term."""

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


def _mlp(n_in: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(n_in, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, 1))


class BiEncoder(SiameseModel):
    """The ``bi_encoder`` family's network: swap-equivariant win and tie MLPs on (u, v)."""

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


def _encoder_config(path: str, attention_dropout: float | None):
    config = AutoConfig.from_pretrained(path)
    if attention_dropout is not None:
        for key in DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, attention_dropout)
    return config


def build(cfg, make_model):
    """Pretrained encoder (``cfg.model_name``) wrapped by ``make_model(encoder, cfg)``, and its tokenizer."""
    path = resolve_model(cfg.model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path, config=_encoder_config(path, cfg.training.attention_dropout),
                                        dtype=torch.float32)
    if cfg.training.gradient_checkpointing:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return make_model(encoder, cfg), tokenizer


def save(model: SiameseModel, tokenizer, model_dir: Path) -> None:
    """The encoder as a transformers folder, the head in ``head.safetensors``, the tokenizer."""
    model_dir = Path(model_dir)
    model.encoder.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.head_state_dict().items()}, str(model_dir / HEAD_FILE))


def load(model_dir: Path, cfg, make_model):
    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoder = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    model = make_model(encoder, cfg)
    head = load_file(str(model_dir / HEAD_FILE))
    missing = set(model.head_state_dict()) ^ set(head)
    if missing:
        raise RuntimeError(f"{model_dir / HEAD_FILE}: head tensors do not match the model: {sorted(missing)[:5]}")
    model.load_state_dict(head, strict=False)
    return model.eval(), tokenizer
