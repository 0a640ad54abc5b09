"""Sliding-window (long-context) reading for the cross-encoder family: ``window:`` in its config.

Each part of a row (the prompt, response A, response B; a part's turns joined by blank lines) is tokenised
whole and cut into windows of ``max_length`` tokens (tokenizer specials and the part's tag
``<PROMPT>`` / ``<RESPONSE A>`` / ``<RESPONSE B>`` included) that start every ``window.stride`` tokens, the last
one ending at the part's end, so every token of the part is read. A part longer than ``window.max_windows``
windows keeps its last windows (``truncation_side: left``) or its first (``right``). Every window goes through
the shared encoder; its token states are mean-pooled, then the windows of a part are averaged into one
vector per part: p, a, b. The head reads [p, a, b, a - b, a * b] (3 classes). It is not swap-equivariant by
construction (a and b sit in fixed places), so the family's TTA applies as for the plain cross-encoder.

A batch is ``input_ids`` / ``attention_mask`` of shape (rows, 3, windows, width); windows that a part does
not have are all padding (mask 0) and are skipped by the encoder.
"""

from __future__ import annotations

import functools

import pandas as pd
import torch
from torch import nn

from gpu_jobs import inputs as D
from gpu_jobs.contract.turns import parse_turns
from gpu_jobs.models import pairwise
from gpu_jobs.models.neural import RowIO

PART_TAGS = ("<PROMPT>", "<RESPONSE A>", "<RESPONSE B>")


# ------------------------------------------------------------------------------------------ text
def window_starts(n: int, body: int, stride: int) -> list[int]:
    """Start offsets of windows of ``body`` tokens every ``stride`` tokens, the last ending at ``n``."""
    if n <= body:
        return [0]
    starts = list(range(0, n - body + 1, stride))
    if starts[-1] + body < n:
        starts.append(n - body)
    return starts


def encode_frame(frame: pd.DataFrame, tokenizer, max_length: int, truncation_side: str = "left",
                 swap: bool = False, max_chars_per_part: int = 0, *, stride: int,
                 max_windows: int) -> list[list[list[list[int]]]]:
    """Per row: for each part (prompt, A, B), its windows' token ids (specials and part tag included)."""
    prefix, suffix = D._special_wrap(tokenizer)
    tags = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in PART_TAGS]
    body = max_length - len(prefix) - len(suffix) - max(len(t) for t in tags)
    if body < 16:
        raise ValueError(f"max_length {max_length} leaves no room for text in a window")
    stride = min(stride, body)
    max_chars = max_chars_per_part or 12 * max_length * max_windows
    col_a, col_b = ("response_b", "response_a") if swap else ("response_a", "response_b")
    texts = [["\n\n".join(parse_turns(v)) for v in frame[c].tolist()] for c in ("prompt", col_a, col_b)]
    texts = [[t[-max_chars:] if truncation_side == "left" else t[:max_chars] for t in col] for col in texts]
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):  # parts are tokenised whole on purpose; windows are cut below
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
    flat = [t for col in texts for t in col]
    tokenised = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    n = len(frame)
    rows = []
    for i in range(n):
        parts = []
        for j in range(3):
            ids = tokenised[j * n + i]
            starts = window_starts(len(ids), body, stride)
            if len(starts) > max_windows:
                starts = starts[-max_windows:] if truncation_side == "left" else starts[:max_windows]
            parts.append([prefix + tags[j] + ids[s:s + body] + suffix for s in starts])
        rows.append(parts)
    return rows


def row_length(row) -> int:
    """Tokens a row costs (all its windows): batches are grouped and sorted by this."""
    return sum(len(w) for part in row for w in part)


class Collator:
    """(rows, 3, most windows, widest window) ids and mask; missing windows are all padding."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad, self.multiple = pad_token_id, pad_to_multiple_of

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        n_win = max(len(part) for it in items for part in it["input_ids"])
        width = max(len(w) for it in items for part in it["input_ids"] for w in part)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        input_ids = torch.full((len(items), 3, n_win, width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, it in enumerate(items):
            for p, part in enumerate(it["input_ids"]):
                for w, ids in enumerate(part):
                    input_ids[r, p, w, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
                    mask[r, p, w, :len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask,
                 "index": torch.as_tensor([it["index"] for it in items], dtype=torch.long)}
        if "targets" in items[0]:
            batch["targets"] = torch.stack([torch.as_tensor(it["targets"], dtype=torch.float32) for it in items])
            batch["weight"] = torch.as_tensor([it["weight"] for it in items], dtype=torch.float32)
        return batch


def row_io(cfg) -> RowIO:
    """The cross-encoder family's ``RowIO`` for a config with a ``window`` section."""
    w = cfg.window
    return RowIO(functools.partial(encode_frame, stride=w.stride, max_windows=w.max_windows), Collator, row_length)


# ------------------------------------------------------------------------------------------ model
class WindowedCrossEncoder(nn.Module):
    def __init__(self, encoder, cfg=None):
        super().__init__()
        self.encoder = encoder
        h = encoder.config.hidden_size
        self.classifier = nn.Sequential(nn.Linear(5 * h, h), nn.GELU(), nn.Linear(h, 3))

    def part_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(rows, 3, hidden): each part's windows mean-pooled, then averaged (float32)."""
        rows, parts, n_win, width = input_ids.shape
        ids, mask = input_ids.reshape(-1, width), attention_mask.reshape(-1, width)
        live = mask.sum(1) > 0
        hidden = self.encoder(input_ids=ids[live], attention_mask=mask[live]).last_hidden_state.float()
        m = mask[live].unsqueeze(-1).to(hidden.dtype)
        pooled = hidden.new_zeros(ids.shape[0], hidden.shape[-1])
        pooled[live] = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        w = live.view(rows, parts, n_win, 1).to(pooled.dtype)
        return (pooled.view(rows, parts, n_win, -1) * w).sum(2) / w.sum(2).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        from transformers.modeling_outputs import SequenceClassifierOutput

        p, a, b = self.part_vectors(input_ids, attention_mask).unbind(1)
        return SequenceClassifierOutput(logits=self.classifier(torch.cat([p, a, b, a - b, a * b], dim=-1)))

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}


def build(cfg):
    return pairwise.build(cfg, WindowedCrossEncoder)


def save(model, tokenizer, model_dir) -> None:
    pairwise.save(model, tokenizer, model_dir)


def load(model_dir, cfg):
    return pairwise.load(model_dir, cfg, WindowedCrossEncoder)
