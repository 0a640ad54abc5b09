"""Reading the training parquet (contract 2), text formatting with a token budget, swap, batching.

Text of one pair, per turn (DESIGN §1):
    <PROMPT>p</PROMPT><RESPONSE A>a</RESPONSE A><RESPONSE B>b</RESPONSE B>
When the conversation does not fit ``max_length`` tokens, whole turns are dropped from one side
(``truncation_side: left`` drops the earliest turns, keeping the latest; ``right`` drops the latest), and
the turn at the edge is kept with all three parts trimmed proportionally to their lengths (each non-empty
part keeping at least a few tokens), so response B is never cut off while A and the prompt survive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from gpu_jobs.contract import schema
from gpu_jobs.contract.swap import SWAP_PERMUTATION, swap_frame  # noqa: F401  (the jobs' D.swap_frame)
from gpu_jobs.contract.ties import ties_possible  # noqa: F401  (the jobs' D.ties_possible)
from gpu_jobs.contract.turns import parse_turns

# the contract's column names as lists (pandas indexes with lists; tuples would be one key)
TEXT_COLUMNS = list(schema.TEXT_COLUMNS)
WINNER_COLUMNS = list(schema.LABEL_COLUMNS)
TARGET_COLUMNS = list(schema.TARGET_COLUMNS)
PROB_COLUMNS = list(schema.PROB_COLUMNS)

TAGS = ("<PROMPT>", "</PROMPT>", "<RESPONSE A>", "</RESPONSE A>", "<RESPONSE B>", "</RESPONSE B>")


# ------------------------------------------------------------------------------------------ reading
def prediction_frame(ids: pd.Series, probs: np.ndarray, folds: pd.Series | None = None) -> pd.DataFrame:
    """The prediction contract: ``id`` (str), optional ``fold``, then ``p_a``, ``p_b``, ``p_tie`` (float64)."""
    out = pd.DataFrame({"id": ids.astype(str).to_numpy()})
    if folds is not None:
        out["fold"] = folds.to_numpy().astype(np.int64)
    for j, col in enumerate(PROB_COLUMNS):
        out[col] = probs[:, j].astype(np.float64)
    return out


def read_frame(path: str | Path, require_labels: bool = False) -> pd.DataFrame:
    """Read a pairs parquet and check the columns the jobs need (errors name the file and column)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: data file not found")
    frame = pd.read_parquet(path)
    check_columns(frame, str(path), ["id", *TEXT_COLUMNS] + (WINNER_COLUMNS if require_labels else []))
    return frame.reset_index(drop=True)


def check_columns(frame: pd.DataFrame, source: str, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; contract 2 needs id, prompt, response_a, "
                         f"response_b, fold and target_* or winner_* (see docs/architecture.md)")


def targets(frame: pd.DataFrame, source: str = "<frame>") -> np.ndarray:
    """(n, 3) float32 training targets: soft ``target_*`` when present, else the one-hot ``winner_*``."""
    cols = TARGET_COLUMNS if all(c in frame.columns for c in TARGET_COLUMNS) else WINNER_COLUMNS
    check_columns(frame, source, cols)
    values = frame[cols].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values).all(axis=1) | (values < 0).any(axis=1) | (np.abs(values.sum(axis=1) - 1) > 1e-3)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{source}: row id {frame['id'].iloc[i]!r}: columns {cols} must be non-negative and sum "
                         f"to 1, got {values[i].tolist()} ({int(bad.sum())} bad rows); fix or drop them upstream")
    return (values / values.sum(axis=1, keepdims=True)).astype(np.float32)


def labels(frame: pd.DataFrame, source: str = "<frame>") -> np.ndarray:
    """Class index 0=A, 1=B, 2=tie from the one-hot ``winner_*`` columns."""
    check_columns(frame, source, WINNER_COLUMNS)
    return frame[WINNER_COLUMNS].to_numpy().argmax(axis=1)


def sample_weights(frame: pd.DataFrame, source: str = "<frame>") -> np.ndarray:
    if "sample_weight" not in frame.columns:
        return np.ones(len(frame), dtype=np.float32)
    w = frame["sample_weight"].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{source}: row id {frame['id'].iloc[i]!r}: column 'sample_weight' must be finite and >= 0, got {w[i]}")
    return w.astype(np.float32)


def split_fold(frame: pd.DataFrame, fold: int, source: str = "<frame>") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows with ``fold == K`` are validation (must carry ``winner_*``); all others, -1 included, train."""
    check_columns(frame, source, ["fold"])
    is_val = frame["fold"].to_numpy() == fold
    train, val = frame[~is_val].reset_index(drop=True), frame[is_val].reset_index(drop=True)
    if len(val) == 0:
        raise ValueError(f"{source}: column 'fold' has no rows with fold == {fold}; folds present: "
                         f"{sorted(frame['fold'].unique().tolist())}")
    if len(train) == 0:
        raise ValueError(f"{source}: no training rows left after holding out fold {fold}")
    check_columns(val, source + f" (validation fold {fold})", WINNER_COLUMNS)
    if val[WINNER_COLUMNS].isna().any().any():
        raise ValueError(f"{source}: validation rows of fold {fold} must carry winner_* labels (found nulls)")
    return train, val


# ------------------------------------------------------------------------------------------ text
def _special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """Ids the tokenizer adds around a single sequence (e.g. [CLS] ... [SEP]; nothing for SmolLM2)."""
    cached = getattr(tokenizer, "_arena_wrap", None)
    if cached is not None:
        return cached
    probe = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    start = next(i for i in range(len(full)) if full[i:i + len(probe)] == probe)
    wrap = (list(full[:start]), list(full[start + len(probe):]))
    try:
        tokenizer._arena_wrap = wrap
    except AttributeError:  # pragma: no cover
        pass
    return wrap


def _tag_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TAGS]


MIN_PART_TOKENS = 8  # a trimmed non-empty part keeps at least min(its length, this) tokens when room allows


def _trim_parts(parts: list[list[int]], room: int) -> list[list[int]]:
    """Cut the parts (keeping each one's beginning) so they total ``room`` tokens.

    Every non-empty part first gets a floor of ``min(len, MIN_PART_TOKENS)`` tokens (the floor is lowered to
    ``room // n_non_empty`` when room is short), so a short "Yes" next to a long prompt and a long other
    response is not rounded away; the rest of the room is shared proportionally to the remaining lengths.
    Only lengths decide the shares, so A and B are treated alike and swapping them gives exactly the swapped
    token sequence."""
    total = sum(len(p) for p in parts)
    if total <= room:
        return parts
    room = max(room, 0)
    non_empty = sum(1 for p in parts if p)
    floor = min(MIN_PART_TOKENS, room // max(non_empty, 1))
    base = [min(len(p), floor) for p in parts]
    rest, left = room - sum(base), total - sum(base)  # left > 0 since total > room >= sum(base)
    keep = [b + (len(p) - b) * rest // left for p, b in zip(parts, base)]
    # the rounding remainder (<= 2 tokens) goes to the prompt only, so that A and B are treated alike
    keep[0] = min(len(parts[0]), keep[0] + room - sum(keep))
    return [p[:k] for p, k in zip(parts, keep)]


def format_ids(prompt: list[list[int]], resp_a: list[list[int]], resp_b: list[list[int]], tags: list[list[int]],
               budget: int, truncation_side: str = "left") -> list[int]:
    """Token ids of the tagged conversation within ``budget`` tokens (without the tokenizer's specials)."""
    n = max(len(prompt), len(resp_a), len(resp_b))
    turns = [(prompt[i] if i < len(prompt) else [], resp_a[i] if i < len(resp_a) else [],
              resp_b[i] if i < len(resp_b) else []) for i in range(n)]
    tag_len = sum(len(t) for t in tags)
    order = range(n - 1, -1, -1) if truncation_side == "left" else range(n)
    kept: dict[int, list[list[int]]] = {}
    used = 0
    for i in order:
        size = tag_len + sum(len(p) for p in turns[i])
        if used + size <= budget:
            kept[i] = list(turns[i])
            used += size
            continue
        room = budget - used - tag_len
        # the edge turn is kept trimmed when it is the only one, or when a useful piece of it fits
        if not kept or room >= 24:
            kept[i] = _trim_parts(list(turns[i]), room)
        break
    ids: list[int] = []
    for i in sorted(kept):
        p, a, b = kept[i]
        ids += tags[0] + p + tags[1] + tags[2] + a + tags[3] + tags[4] + b + tags[5]
    return ids[:budget]


def encode_frame(frame: pd.DataFrame, tokenizer, max_length: int, truncation_side: str = "left",
                 swap: bool = False, max_chars_per_part: int = 0) -> list[list[int]]:
    """Token ids for every row (tokenizer specials included), each at most ``max_length`` long."""
    prefix, suffix = _special_wrap(tokenizer)
    budget = max_length - len(prefix) - len(suffix)
    if budget < 16:
        raise ValueError(f"max_length {max_length} leaves no room for text")
    tags = _tag_ids(tokenizer)
    max_chars = max_chars_per_part or 12 * max_length  # a part longer than this cannot fit anyway
    col_a, col_b = ("response_b", "response_a") if swap else ("response_a", "response_b")
    per_col = tokenize_turns(frame, tokenizer, ("prompt", col_a, col_b), max_chars)
    return [prefix + format_ids(p, a, b, tags, budget, truncation_side) + suffix
            for p, a, b in zip(*per_col)]


def tokenize_turns(frame: pd.DataFrame, tokenizer, columns: Sequence[str],
                   max_chars: int) -> list[list[list[list[int]]]]:
    """Token ids (no specials) per column, row and turn, each turn cut to ``max_chars`` characters first;
    one tokenizer call for everything."""
    cells = [[parse_turns(v) for v in frame[c].tolist()] for c in columns]
    flat = [t[:max_chars] for col in cells for row in col for t in row]
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):  # parts are tokenised whole on purpose; the budget is applied by the caller
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
    tokenised = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    pos = 0
    per_col: list[list[list[list[int]]]] = []
    for col in cells:
        rows = []
        for row in col:
            rows.append(tokenised[pos:pos + len(row)])
            pos += len(row)
        per_col.append(rows)
    return per_col


def format_text(frame: pd.DataFrame, row: int = 0, swap: bool = False) -> str:
    """The untruncated tagged text of one row (for reading and tests)."""
    r = frame.iloc[row]
    a, b = ("response_b", "response_a") if swap else ("response_a", "response_b")
    p, ra, rb = parse_turns(r["prompt"]), parse_turns(r[a]), parse_turns(r[b])
    return "".join(f"<PROMPT>{x}</PROMPT><RESPONSE A>{y}</RESPONSE A><RESPONSE B>{z}</RESPONSE B>"
                   for x, y, z in zip(p, ra, rb))


# ------------------------------------------------------------------------------------------ batching
class PairsDataset(torch.utils.data.Dataset):
    def __init__(self, ids: list[list[int]], targets: np.ndarray | None = None, weights: np.ndarray | None = None):
        self.ids, self.targets, self.weights = ids, targets, weights

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.ids[i], "index": i}
        if self.targets is not None:
            item["targets"] = self.targets[i]
            item["weight"] = 1.0 if self.weights is None else float(self.weights[i])
        return item


class Collator:
    """Dynamic padding: pad each batch to its own longest row (right side), optionally to a multiple of 8."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id, self.multiple = pad_token_id, pad_to_multiple_of

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for j, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[j, :n] = torch.as_tensor(it["input_ids"], dtype=torch.long)
            mask[j, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask,
                 "index": torch.as_tensor([it["index"] for it in items], dtype=torch.long)}
        if "targets" in items[0]:
            batch["targets"] = torch.as_tensor(np.stack([it["targets"] for it in items]), dtype=torch.float32)
            batch["weight"] = torch.as_tensor([it["weight"] for it in items], dtype=torch.float32)
        return batch


class LengthGroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled batches of similar length: a seeded permutation is cut into megabatches of
    ``batch_size * megabatch_mult`` rows, each sorted by length and cut into batches; batch order is shuffled
    except that the longest batch goes first (an out-of-memory shows up at step 1, not at the end)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 42, megabatch_mult: int = 50,
                 shuffle: bool = True):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.mult, self.shuffle = batch_size, seed, megabatch_mult, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        n = len(self.lengths)
        perm = rng.permutation(n) if self.shuffle else np.arange(n)
        mega = self.batch_size * self.mult
        batches = []
        for s in range(0, n, mega):
            chunk = perm[s:s + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        if self.shuffle and len(batches) > 1:
            longest = int(np.argmax([self.lengths[b].max() for b in batches]))
            batches[0], batches[longest] = batches[longest], batches[0]
            rest = [batches[i] for i in rng.permutation(np.arange(1, len(batches)))]
            batches = [batches[0]] + rest
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()


class RandomBatchSampler(LengthGroupedBatchSampler):
    """Plain shuffled batches (``group_by_length: false``)."""

    def batches(self) -> list[list[int]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        perm = rng.permutation(len(self.lengths))
        return [perm[i:i + self.batch_size].tolist() for i in range(0, len(perm), self.batch_size)]


def sorted_batches(lengths: Sequence[int], batch_size: int, sort: bool = True) -> list[np.ndarray]:
    """Inference batches: row indices in length order (longest first), cut into batches."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable") if sort else np.arange(len(lengths))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
