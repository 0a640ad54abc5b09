"""gpu_jobs.models.reward_model: Davidson probabilities from two rewards, exact A/B swap symmetry, training
through the same gpu_jobs.train loop and job (real arena-bench rows, the shipped MiniLM)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from arena_pipeline_tests.gpu_jobs.family_support import CONFIGS, PAIRS, ROOT, overfit_stats, rows, run_train_job
from gpu_jobs import inputs as D
from gpu_jobs.config import load_config
from gpu_jobs.contract.swap import swap_frame, swap_probs
from gpu_jobs.models import pairwise, reward_model
from gpu_jobs.predict import predict_frame, predict_loaded

CONFIG = CONFIGS / "reward_model_minilm.yaml"
SMALL = ["training.max_length=64", "inference.max_length=64", "inference.batch_size=5", "training.batch_size=8"]


def test_davidson_logits_give_the_closed_form_probabilities():
    r_a, r_b, log_nu = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([0.1, 0.5, 2.0]), torch.tensor(-0.4)
    p = torch.softmax(pairwise.davidson_logits(r_a, r_b, log_nu), dim=-1)
    nu = np.exp(-0.4)
    ea, eb, et = np.exp(r_a.numpy()), np.exp(r_b.numpy()), nu * np.sqrt(np.exp(r_a.numpy() + r_b.numpy()))
    z = ea + eb + et
    np.testing.assert_allclose(p.numpy(), np.stack([ea / z, eb / z, et / z], axis=1), rtol=1e-6)
    # equal rewards: P(tie) = nu / (2 + nu), whatever the common reward
    assert p[2, 2].item() == pytest.approx(nu / (2 + nu), rel=1e-6)


def test_untrained_model_predicts_probabilities_that_permute_exactly_under_a_swap(tmp_path):
    cfg = load_config(CONFIG, SMALL + ["precision=fp32"])
    model, tokenizer = reward_model.build(cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # a larger-scale head, so that the rewards differ visibly between rows and sides
        model.reward_head.weight.normal_(0, 2.0)
    frame = rows(12)
    probs, probs_tta = predict_loaded(cfg, model.eval(), tokenizer, frame, tta=True, device=torch.device("cpu"))
    assert probs.shape == (12, 3) and np.allclose(probs.sum(1), 1, atol=1e-6)
    assert np.abs(probs[:, 0] - probs[:, 1]).max() > 1e-3  # A and B really differ
    swapped, _ = predict_loaded(cfg, model, tokenizer, swap_frame(frame), device=torch.device("cpu"))
    np.testing.assert_allclose(swap_probs(swapped), probs, atol=1e-6)
    np.testing.assert_allclose(probs_tta, probs, atol=1e-6)  # TTA adds nothing to this family
    # save / load round trip gives the same numbers (encoder folder + head.safetensors + tokenizer)
    from gpu_jobs.config import save_config

    reward_model.save(model, tokenizer, tmp_path)
    save_config(cfg, tmp_path / "config.yaml")
    again, _ = predict_frame(tmp_path, frame)
    np.testing.assert_allclose(again, probs, atol=1e-6)


def test_loss_goes_down_on_an_overfittable_batch():
    cfg = load_config(CONFIG, [
        "training.max_length=48", "training.batch_size=8", "training.epochs=8", "training.lr=1e-3",
        "training.head_lr=1e-2", "training.warmup_steps=0", "training.scheduler=constant",
        "training.weight_decay=0", "precision=fp32"])
    stats = overfit_stats(cfg, rows(8))
    assert stats["n_steps"] == 8 and stats["train_examples_per_s"] > 0
    assert stats["final_train_loss"] < 0.7 * stats["first_train_loss"], stats


def test_train_job_writes_oof_and_metrics_and_its_model_predicts_swap_exactly(tmp_path):
    frame = rows(24, seed=1)
    extra = tmp_path / "extra.parquet"
    frame.head(6).drop(columns=D.WINNER_COLUMNS + ["fold"]).to_parquet(extra)
    out, metrics = run_train_job(CONFIG, frame, tmp_path, 0, [*SMALL, "training.epochs=1"],
                                 extra=["--predict", f"extra={extra}"])
    oof = pd.read_parquet(out / "oof.parquet")
    assert set(oof.id) == set(frame.id[frame.fold == 0]) and (oof.fold == 0).all()
    assert np.allclose(oof[["p_a", "p_b", "p_tie"]].sum(axis=1), 1, atol=1e-6)
    assert len(pd.read_parquet(out / "pred_extra.parquet")) == 6
    assert not (out / "oof_tta.parquet").exists()  # tta: false in the config
    assert metrics["family"] == "reward_model" and metrics["n_train"] == 18 and metrics["n_val"] == 6
    assert metrics["train_examples_per_s"] > 0 and metrics["wall_s"] > 0
    val = frame[frame.fold == 0].reset_index(drop=True)
    probs, _ = predict_frame(out / "model", val)
    swapped, _ = predict_frame(out / "model", swap_frame(val))
    np.testing.assert_allclose(swap_probs(swapped), probs, atol=1e-6)
    np.testing.assert_allclose(probs, oof.set_index("id").loc[val.id, ["p_a", "p_b", "p_tie"]].to_numpy(), atol=1e-5)


# ------------------------------------------------------------------------------------------ pre-training
ANSWERS = ROOT / "data" / "shipped" / "arena_bench_answers.parquet"


def test_answer_pairs_are_graded_by_the_score_gap_and_skip_held_out_prompts():
    answers = pd.read_parquet(ANSWERS)
    pairs_all, dropped_none = reward_model.answer_pairs(answers, None, score_scale=2.0)
    assert dropped_none == 0 and 25_000 < len(pairs_all) <= 29_972  # every within-question pair (bar equal texts)
    held_out = pd.read_parquet(PAIRS).drop(columns=["question_id"]).sample(200, random_state=0)
    pairs, dropped = reward_model.answer_pairs(answers, held_out, score_scale=2.0)
    banned = {reward_model.prompt_key(c) for c in held_out["prompt"]}
    assert dropped > 0 and len(pairs) < len(pairs_all)
    assert not any(reward_model.prompt_key(c) in banned for c in pairs["prompt"])  # fold discipline
    # soft target from the judge-score gap: sigmoid((s_A - s_B) / scale)
    score = dict(zip(zip(answers.prompt, answers.response), answers.judge_score))
    gap = np.array([score[(p, a)] - score[(p, b)] for p, a, b in pairs[["prompt", "response_a", "response_b"]].head(50).to_numpy()])
    np.testing.assert_allclose(pairs["target_a"].head(50), 1 / (1 + np.exp(-gap / 2.0)))
    assert 0.4 < (pairs["target_a"] > 0.5).mean() / max((pairs["target_a"] != 0.5).mean(), 1e-9) < 0.6  # A/B balanced


def test_train_job_pretrains_on_answer_pairs_without_the_validation_prompts(tmp_path):
    frame = rows(8, seed=4)
    # fp32: on a CPU with native bf16, `auto` trains in bf16, and six steps of bf16 rounding on 16 pairs left the last
    # loss above the first (0.706 vs 0.690); precision itself is test_precision's subject
    out, metrics = run_train_job(CONFIG, frame, tmp_path, 0, [
        *SMALL, "precision=fp32", "training.epochs=1", f"pretrain.data={ANSWERS}", "pretrain.max_pairs=16", "pretrain.batch_size=8",
        "pretrain.epochs=3", "pretrain.lr=1e-3", "pretrain.max_length=40", "pretrain.warmup_steps=0"])
    assert metrics["pretrain_pairs"] == 16 and metrics["pretrain_steps"] == 6
    n_val_prompts = frame[frame.fold == 0]["prompt"].map(reward_model.prompt_key).nunique()
    assert metrics["pretrain_answers_dropped"] >= 12 * n_val_prompts  # >= 12 answers per question
    assert metrics["pretrain_final_loss"] < metrics["pretrain_first_loss"], metrics
    assert metrics["pretrain_examples_per_s"] > 0 and len(pd.read_parquet(out / "oof.parquet")) == 2
