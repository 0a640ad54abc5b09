"""The attention kernel a decoder loads with: the resolution table, and what a tiny real model gets."""

import pytest
import torch

from gpu_jobs.config import load_config
from gpu_jobs.models import llm_classifier
from gpu_jobs.models.attention import resolve_attention
from gpu_jobs.models.loading import resolve_model

CONFIG = "gpu_jobs/configs/llm_gemma2_9b_qlora.yaml"


@pytest.mark.parametrize("requested, model_type, device, half, expected", [
    ("auto", "gemma2", "cpu", True, "eager"),  # SDPA cannot soft-cap: eager, not silently different numbers
    ("auto", "llama", "cpu", False, "sdpa"),
    ("auto", "llama", "cuda", False, "sdpa"),  # fp32 on a GPU: no flash-attention
    ("eager", "llama", "cpu", False, "eager"),
    ("sdpa", "gemma2", "cpu", True, "sdpa"),  # an explicit choice is honoured
])
def test_resolution_table(requested, model_type, device, half, expected):
    name, reason = resolve_attention(requested, model_type, device, half)
    assert name == expected and reason


def test_flash_attention_where_it_cannot_run_fails_naming_the_reason():
    with pytest.raises(ValueError, match="flash_attention_2 cannot run: flash-attention 2 runs on CUDA only"):
        resolve_attention("flash_attention_2", "gemma2", "cpu", True)
    with pytest.raises(ValueError, match="needs bf16 or fp16"):
        resolve_attention("flash_attention_2", "llama", "cuda", False)
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        resolve_attention("flash", "llama", "cpu", True)


def test_config_key_is_validated():
    with pytest.raises(ValueError, match="attn_implementation"):
        load_config(CONFIG, ["attn_implementation=flash"])


@pytest.mark.parametrize("arch, expected", [("gemma2", "eager"), ("llama3", "sdpa")])
def test_tiny_models_load_with_the_resolved_kernel(arch, expected):
    cfg = load_config(CONFIG, [f"model_name=tiny:{arch}", "quantization.load_in_4bit=false", "precision=fp32"])
    path = resolve_model(cfg.model_name)
    assert llm_classifier.attention_for(cfg, path, "cpu", torch.float32)[0] == expected
    model, _ = llm_classifier.build(cfg, device="cpu")
    assert model.base_model.model.config._attn_implementation == expected
