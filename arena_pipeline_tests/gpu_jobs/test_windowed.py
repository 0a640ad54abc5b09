"""gpu_jobs.models.windowed: the cross-encoder's sliding-window option (``window:``), off by default."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from arena_pipeline_tests.gpu_jobs.family_support import CONFIGS, overfit_stats, rows, run_train_job
from gpu_jobs.config import load_config
from gpu_jobs.contract.swap import swap_frame, swap_probs
from gpu_jobs.contract.turns import parse_turns
from gpu_jobs.models import cross_encoder, windowed
from gpu_jobs.predict import predict_frame

CONFIG = CONFIGS / "cross_encoder_minilm.yaml"
WINDOWS = ["window.stride=48", "window.max_windows=3", "training.max_length=64", "inference.max_length=64",
           "training.batch_size=4", "inference.batch_size=4"]


def test_window_starts_cover_every_token_with_the_given_stride():
    assert windowed.window_starts(10, 32, 24) == [0]
    assert windowed.window_starts(100, 32, 24) == [0, 24, 48, 68]
    for n in (33, 57, 200):
        starts = windowed.window_starts(n, 32, 24)
        covered = set().union(*(range(s, s + 32) for s in starts))
        assert covered == set(range(n)) and all(b - a <= 24 for a, b in zip(starts, starts[1:]))


def test_off_by_default_and_checked():
    assert load_config(CONFIG).window is None
    with pytest.raises(ValueError, match="key 'window.stride'"):
        load_config(CONFIG, ["window.stride=0"])


def test_windows_read_each_part_to_its_end():
    cfg = load_config(CONFIG, WINDOWS)
    model, tokenizer = cross_encoder.build(cfg)
    assert isinstance(model, windowed.WindowedCrossEncoder)
    frame = rows(8)
    encode, collator, row_length = cross_encoder.FAMILY.io(cfg)
    encoded = encode(frame, tokenizer, 64, max_chars_per_part=0)
    for r, parts in enumerate(encoded):
        for j, col in enumerate(("prompt", "response_a", "response_b")):
            assert 1 <= len(parts[j]) <= 3 and all(len(w) <= 64 for w in parts[j])
            whole = tokenizer("\n\n".join(parse_turns(frame[col][r])), add_special_tokens=False)["input_ids"]
            last = parts[j][-1]
            assert last[-1] == tokenizer.sep_token_id and whole[-5:] == last[-6:-1]  # the part's end is read
    assert max(len(p) for r in encoded for p in r) == 3  # long answers use several windows
    swapped = encode(frame, tokenizer, 64, swap=True, max_chars_per_part=0)
    tags = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in windowed.PART_TAGS]
    n_tag = len(tags[1])
    assert [[w[1 + n_tag:] for w in r[2]] for r in swapped] == [[w[1 + n_tag:] for w in r[1]] for r in encoded]
    batch = collator(tokenizer.pad_token_id)([{"input_ids": r, "index": i} for i, r in enumerate(encoded)])
    assert batch["input_ids"].shape[:3] == (8, 3, 3)


def test_predict_train_and_tta(tmp_path):
    frame = rows(16, seed=2)
    out, metrics = run_train_job(CONFIG, frame, tmp_path, 0, [*WINDOWS, "training.epochs=1", "tta=true"])
    assert metrics["n_train"] == 12 and metrics["n_val"] == 4 and metrics["train_examples_per_s"] > 0
    oof, oof_tta = pd.read_parquet(out / "oof.parquet"), pd.read_parquet(out / "oof_tta.parquet")
    for pred in (oof, oof_tta):
        assert len(pred) == 4 and np.allclose(pred[["p_a", "p_b", "p_tie"]].sum(axis=1), 1, atol=1e-6)
    assert (out / "model" / "head.safetensors").exists()
    val = frame[frame.fold == 0].reset_index(drop=True)
    probs, probs_tta = predict_frame(out / "model", val, tta=True)
    swapped, _ = predict_frame(out / "model", swap_frame(val))
    np.testing.assert_allclose(swap_probs(swapped), probs_tta, atol=1e-6)  # TTA = the swapped rows, permuted back


def test_loss_goes_down_on_an_overfittable_batch():
    cfg = load_config(CONFIG, [*WINDOWS, "training.epochs=6", "training.batch_size=4", "training.lr=1e-3",
                               "training.head_lr=1e-3", "training.warmup_steps=0", "training.scheduler=constant",
                               "training.weight_decay=0", "training.max_length=40", "window.stride=24",
                               "window.max_windows=2", "precision=fp32"])
    stats = overfit_stats(cfg, rows(4))
    assert stats["n_steps"] == 6
    assert stats["final_train_loss"] < 0.7 * stats["first_train_loss"], stats
