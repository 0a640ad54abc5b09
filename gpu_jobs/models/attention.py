"""Which attention kernel a decoder loads with (`attn_implementation` of `from_pretrained`).

``attn_implementation: auto`` (the default) picks, for the device and dtype the job runs in:

- ``flash_attention_2`` on CUDA in bf16/fp16 when the ``flash_attn`` package is installed (it implements
  Gemma-2's attention soft-capping since flash-attn 2.6; the recipe's 8192-token Gemma/Llama runs need it);
- else ``eager`` for architectures whose attention soft-caps its logits (Gemma-2: PyTorch's SDPA kernel
  cannot, so transformers would compute something else);
- else ``sdpa`` (PyTorch's fused kernel; memory-efficient on CUDA, the fastest on a CPU).

An explicit value is honoured, except ``flash_attention_2`` where it cannot run (no CUDA, fp32, or no
``flash_attn``), which fails naming the key and the reason.
"""

from __future__ import annotations

import importlib.util

ATTENTION = ("auto", "eager", "sdpa", "flash_attention_2")
SOFTCAPPED = ("gemma2",)  # model types whose attention logits are soft-capped


def flash_attention_problem(device_type: str, half_precision: bool) -> str:
    """Why flash-attention 2 cannot run here ('' when it can)."""
    if device_type != "cuda":
        return f"flash-attention 2 runs on CUDA only (this job runs on {device_type})"
    if not half_precision:
        return "flash-attention 2 needs bf16 or fp16 weights (the job resolved fp32)"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash_attn package is not installed (pip install flash-attn --no-build-isolation)"
    return ""


def resolve_attention(requested: str, model_type: str, device_type: str, half_precision: bool) -> tuple[str, str]:
    """(implementation, reason) for ``attn_implementation`` = ``requested``."""
    if requested not in ATTENTION:
        raise ValueError(f"attn_implementation must be one of {ATTENTION}, got {requested!r}")
    problem = flash_attention_problem(device_type, half_precision)
    if requested == "flash_attention_2" and problem:
        raise ValueError(f"attn_implementation: flash_attention_2 cannot run: {problem}")
    if requested != "auto":
        return requested, "set in the config"
    if not problem:
        return "flash_attention_2", "auto: CUDA, half precision and flash_attn installed"
    if model_type in SOFTCAPPED:
        return "eager", f"auto: {model_type} soft-caps attention logits, which SDPA cannot ({problem})"
    return "sdpa", f"auto: PyTorch SDPA ({problem})"
