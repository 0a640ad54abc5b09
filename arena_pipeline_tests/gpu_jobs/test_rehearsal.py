"""The `full` recipe rehearsed on tiny models of its real architectures: for each neural family of the
`full` profile, one training step and one prediction through the real job programs (``gpu_jobs.train`` and
``gpu_jobs.predict`` mains) with the exact arguments the Dagster asset passes (`job_args` of the
`rehearsal` profile, which is `full` with model names and sizes swapped), plus a few rows fewer here.

Checked on the way, inside the training job: 4-bit NF4 with double quantisation, LoRA on all seven
modules, the head trained fully at its own learning rate, gradient checkpointing, group-by-length, left
truncation, and the `paged_adamw_8bit` fallback line on a machine without CUDA.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from arena_pipeline.assets.oof import job_args
from arena_pipeline.profile import FULL, REHEARSAL
from gpu_jobs import train as T

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "data" / "shipped" / "arena_bench_pairs.parquet"
SEVEN = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# a test-sized run: 4 training rows = one batch of 4 = one optimiser step (accumulation 2 ends with the data)
TEST_SIZES = ("training.max_train_rows=4", "training.epochs=1", "training.max_length=64",
              "inference.max_length=96", "inference.batch_size=4")


@pytest.fixture
def rows(tmp_path) -> tuple[Path, Path]:
    frame = pd.read_parquet(PAIRS).sample(12, random_state=3).reset_index(drop=True)
    frame = frame.assign(fold=[0, 0, 0, 0, 1, 1, 2, 2, 3, 3, -1, -1])
    data, extra = tmp_path / "train.parquet", tmp_path / "test.parquet"
    frame.to_parquet(data)
    frame.head(3).drop(columns=["winner_model_a", "winner_model_b", "winner_tie", "fold"]).to_parquet(extra)
    return data, extra


def test_rehearsal_is_full_with_only_model_names_and_sizes_swapped():
    assert REHEARSAL.folds == FULL.folds == (0, 1, 2, 3)
    assert [m.name for m in REHEARSAL.models] == [m.name for m in FULL.models]
    assert [m.config for m in REHEARSAL.models] == [m.config for m in FULL.models]
    assert all(m.stage2 for m in REHEARSAL.models) and REHEARSAL.ensemble_method == FULL.ensemble_method
    allowed = ("model_name=", "training.max_train_rows=", "training.max_length=", "inference.max_length=")
    for full, rehearsal in zip(FULL.models, REHEARSAL.models):
        full_items, items = full.override_items(), rehearsal.override_items()
        added = [o for o in items if o not in full_items]
        assert set(full_items) <= set(items)  # every override of `full` kept
        assert all(o.startswith(allowed) for o in added), added
        assert all(o.split("=", 1)[1].startswith("tiny:") for o in added if o.startswith("model_name="))
    # 3 model swaps, 1 member's two-process accelerate config, 2 prompt files, 9 sizes (+ the transformers
    # fallback of generation where .venv-vllm is missing)
    fallback = REHEARSAL.generate_backend != FULL.generate_backend
    assert len(REHEARSAL.differences) == 15 + fallback
    assert any("generate_backend" in d for d in REHEARSAL.differences) == fallback


def _spy_optimizer(monkeypatch) -> dict:
    """Wrap the real `make_optimizer`: keep the model, config and optimiser the job built."""
    seen: dict = {}
    real = T.make_optimizer

    def spy(model, cfg, head_names):
        optimizer = real(model, cfg, head_names)
        # the 4-bit layers as the training loop gets them (bitsandbytes repacks them for CPU inference later)
        lora = {name: (type(m.base_layer).__name__, m.base_layer.weight.quant_type, m.base_layer.weight.quant_state.nested)
                for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
        seen.update(model=model, cfg=cfg, optimizer=optimizer, head_names=head_names, lora=lora)
        return optimizer

    monkeypatch.setattr(T, "make_optimizer", spy)
    return seen


def _train_and_predict(name: str, rows, tmp_path, monkeypatch, capsys) -> tuple[dict, dict, str]:
    from accelerate.state import AcceleratorState

    from gpu_jobs import predict as P

    data, extra = rows
    monkeypatch.delenv("DAGSTER_PIPES_CONTEXT", raising=False)
    seen = _spy_optimizer(monkeypatch)
    out = tmp_path / "out"
    args = job_args(REHEARSAL.model(name), 0, data, out, list(TEST_SIZES))
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        assert T.main(args + ["--predict", f"test={extra}"]) == 0
        AcceleratorState._reset_state(reset_partial_state=True)
        assert P.main(["--model-dir", str(out / "model"), "--data", str(extra), "--output",
                       str(tmp_path / "pred.parquet"), "--tta"]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_steps"] == 1 and metrics["n_train"] == 4 and metrics["n_val"] == 4
    assert np.isfinite(metrics["final_train_loss"]) and np.isfinite(metrics["val_log_loss"])
    for file in ("oof.parquet", "oof_tta.parquet", "pred_test.parquet", "pred_test_tta.parquet"):
        assert (out / file).exists(), file
    pred, pred_tta = pd.read_parquet(tmp_path / "pred.parquet"), pd.read_parquet(tmp_path / "pred_tta.parquet")
    assert len(pred) == len(pred_tta) == 3
    assert np.allclose(pred[["p_a", "p_b", "p_tie"]].sum(axis=1), 1, atol=1e-6)
    # the stand-alone prediction program reproduces the training job's own prediction of the same rows
    in_job = pd.read_parquet(out / "pred_test.parquet")
    np.testing.assert_allclose(pred[["p_a", "p_b", "p_tie"]], in_job[["p_a", "p_b", "p_tie"]], atol=2e-2)
    cfg = seen["cfg"]
    assert cfg.model_name.startswith("tiny:") and cfg.tta and cfg.training.group_by_length
    assert cfg.text.truncation_side == "left" and cfg.training.gradient_checkpointing
    return seen, metrics, capsys.readouterr().err


def _head_and_body_lrs(seen) -> tuple[set, set]:
    head, body = set(), set()
    names = {id(p): n for n, p in seen["model"].named_parameters()}
    for group in seen["optimizer"].param_groups:
        for p in group["params"]:
            is_head = any(part in seen["head_names"] for part in names[id(p)].split("."))
            (head if is_head else body).add(group.get("initial_lr", group["lr"]))  # before warm-up scaling
    return head, body


@pytest.mark.parametrize("name,arch", [("llm_gemma2_9b_qlora", "gemma2"), ("llm_llama3_8b_qlora", "llama3")])
def test_qlora_family_one_step_and_one_prediction(name, arch, rows, tmp_path, monkeypatch, capsys):
    import bitsandbytes as bnb

    seen, metrics, stderr = _train_and_predict(name, rows, tmp_path, monkeypatch, capsys)
    model, cfg = seen["model"], seen["cfg"]
    base = model.get_base_model()
    assert base.config.model_type == {"gemma2": "gemma2", "llama3": "llama"}[arch]
    assert base.is_loaded_in_4bit and base.is_gradient_checkpointing
    q = cfg.quantization
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert set(seen["lora"].values()) == {("Linear4bit", "nf4", True)}  # NF4, nested = double quant
    assert {name.rsplit(".", 1)[-1] for name in seen["lora"]} == SEVEN and len(seen["lora"]) == 7 * 2  # 2 layers and set(cfg.lora.target_modules) == SEVEN
    assert cfg.lora.r == 64 and cfg.lora.alpha == 16 and cfg.lora.dropout == 0.05
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score.modules_to_save" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    head_lrs, body_lrs = _head_and_body_lrs(seen)
    assert head_lrs == {cfg.training.head_lr} == {1e-5} and body_lrs == {cfg.training.lr} == {1e-4}
    assert cfg.training.optimizer == "paged_adamw_8bit"
    if torch.cuda.is_available():
        assert isinstance(seen["optimizer"], bnb.optim.PagedAdamW8bit)
    else:  # never silent: one line names the fallback
        assert type(seen["optimizer"]) is bnb.optim.AdamW8bit
        lines = [line for line in stderr.splitlines() if "paged_adamw_8bit" in line]
        assert len(lines) == 1 and "fallback bitsandbytes AdamW8bit" in lines[0], stderr[-2000:]


def test_deberta_cross_encoder_one_step_and_one_prediction(rows, tmp_path, monkeypatch, capsys):
    seen, metrics, _ = _train_and_predict("cross_encoder_deberta_v3", rows, tmp_path, monkeypatch, capsys)
    model, cfg = seen["model"], seen["cfg"]
    assert model.config.model_type == "deberta-v2" and model.config.relative_attention
    assert model.is_gradient_checkpointing
    head_lrs, body_lrs = _head_and_body_lrs(seen)
    assert head_lrs == {cfg.training.head_lr} == {1e-4} and body_lrs == {cfg.training.lr} == {1e-5}
