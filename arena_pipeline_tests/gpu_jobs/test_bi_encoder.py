"""gpu_jobs.models.bi_encoder: siamese encoder with a swap-equivariant head; exact A/B swap symmetry, training
through the same gpu_jobs.train loop and job (real arena-bench rows, the shipped MiniLM)."""

from __future__ import annotations

import numpy as np
import torch

from arena_pipeline_tests.gpu_jobs.family_support import CONFIGS, overfit_stats, rows, run_train_job
from gpu_jobs.config import load_config
from gpu_jobs.contract.swap import swap_frame, swap_probs
from gpu_jobs.models import bi_encoder, pairwise
from gpu_jobs.predict import predict_frame, predict_loaded

CONFIG = CONFIGS / "bi_encoder_minilm.yaml"
SMALL = ["training.max_length=64", "inference.max_length=64", "inference.batch_size=5", "training.batch_size=8"]


def test_head_is_swap_equivariant_on_random_vectors():
    torch.manual_seed(0)
    head = pairwise.BiEncoder.head_logits
    model = torch.nn.Module()
    model.win_head, model.tie_head = pairwise._mlp(4 * 8, 16, 0.0), pairwise._mlp(3 * 8, 16, 0.0)
    u, v = torch.randn(5, 8), torch.randn(5, 8)
    logits, swapped = head(model, u, v), head(model, v, u)
    assert torch.equal(swapped, logits[:, [1, 0, 2]])


def test_each_side_reads_the_prompt_and_one_response_with_the_same_tags():
    cfg = load_config(CONFIG, SMALL)
    _, tokenizer = bi_encoder.build(cfg)
    frame = rows(6)
    ids = pairwise.encode_frame(frame, tokenizer, 64)
    assert len(ids) == 6 and all(len(a) <= 64 and len(b) <= 64 for a, b in ids)
    assert pairwise.encode_frame(swap_frame(frame), tokenizer, 64) == [(b, a) for a, b in ids]
    assert pairwise.encode_frame(frame, tokenizer, 64, swap=True) == [(b, a) for a, b in ids]
    text = tokenizer.decode(ids[0][0])
    assert "< prompt >" in text and "< response >" in text and "response a" not in text
    batch = pairwise.Collator(tokenizer.pad_token_id)([{"input_ids": r, "index": i} for i, r in enumerate(ids)])
    assert batch["input_ids"].shape[:2] == (6, 2) and batch["input_ids"].shape[2] == max(map(pairwise.row_length, ids))


def test_untrained_model_predicts_probabilities_that_permute_exactly_under_a_swap():
    cfg = load_config(CONFIG, SMALL + ["precision=fp32"])
    model, tokenizer = bi_encoder.build(cfg)
    frame = rows(12)
    probs, _ = predict_loaded(cfg, model.eval(), tokenizer, frame, device=torch.device("cpu"))
    assert probs.shape == (12, 3) and np.allclose(probs.sum(1), 1, atol=1e-6)
    assert np.abs(probs[:, 0] - probs[:, 1]).max() > 1e-4  # A and B really differ
    swapped, _ = predict_loaded(cfg, model, tokenizer, swap_frame(frame), device=torch.device("cpu"))
    np.testing.assert_allclose(swap_probs(swapped), probs, atol=1e-6)


def test_loss_goes_down_on_an_overfittable_batch():
    cfg = load_config(CONFIG, [
        "training.max_length=48", "training.batch_size=8", "training.epochs=8", "training.lr=1e-3",
        "training.head_lr=3e-3", "training.warmup_steps=0", "training.scheduler=constant",
        "training.weight_decay=0", "head_dropout=0.0", "precision=fp32"])
    stats = overfit_stats(cfg, rows(8))
    assert stats["n_steps"] == 8
    assert stats["final_train_loss"] < 0.7 * stats["first_train_loss"], stats


def test_train_job_writes_oof_and_metrics_and_its_model_predicts_swap_exactly(tmp_path):
    frame = rows(24, seed=1)
    out, metrics = run_train_job(CONFIG, frame, tmp_path, 1, [*SMALL, "training.epochs=1"])
    import pandas as pd

    oof = pd.read_parquet(out / "oof.parquet")
    assert set(oof.id) == set(frame.id[frame.fold == 1]) and (oof.fold == 1).all()
    assert np.allclose(oof[["p_a", "p_b", "p_tie"]].sum(axis=1), 1, atol=1e-6)
    assert metrics["family"] == "bi_encoder" and metrics["n_train"] == 18 and metrics["train_examples_per_s"] > 0
    val = frame[frame.fold == 1].reset_index(drop=True)
    probs, _ = predict_frame(out / "model", val)
    swapped, _ = predict_frame(out / "model", swap_frame(val))
    np.testing.assert_allclose(swap_probs(swapped), probs, atol=1e-6)
