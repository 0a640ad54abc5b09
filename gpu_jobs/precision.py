"""Which floating-point precision a job computes in: asked of the hardware, never a config constant.

Every place that picks a dtype (training autocast, prediction, QLoRA compute dtype, model loading,
transformers and vLLM generation) calls :func:`resolve`:

    p = resolve("auto", "cpu")   # -> Precision(name="fp32", ...) on a CPU without bf16 kernels
    p.dtype, p.mixed_precision   # torch.float32, "no" (accelerate's value)

``auto`` picks the fastest precision the device runs natively: on CUDA bf16 where the GPU has it, else
fp16; on a CPU bf16 where oneDNN has native bf16 kernels (AVX-512-BF16 or AMX), else fp32. On a CPU
without them bf16 autocast is emulated and ~20x slower than fp32 (DESIGN §5: a MiniLM training step
3.7 s fp32 vs 76–94 s bf16 on an AVX2-only EPYC). An explicit ``bf16`` / ``fp16`` on hardware without it is
honoured, with a one-line warning that names the expected slowdown.

oneDNN honours ``ONEDNN_MAX_CPU_ISA=AVX2``, so that variable imitates a CPU without bf16 kernels.
This module imports torch lazily: it also serves the vLLM environment.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_ACCELERATE = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
# what the slowdown looks like when a precision is forced on hardware without native kernels for it
_SLOWDOWN = {
    ("cpu", "bf16"): "bf16 is emulated on this CPU (no AVX-512-BF16/AMX): expect training ~20x and "
                     "generation ~3x slower than fp32",
    ("cpu", "fp16"): "fp16 is emulated on this CPU (no AVX-512-FP16/AMX-FP16): expect it to be several times "
                     "slower than fp32",
    ("cuda", "bf16"): "this GPU has no native bf16: expect it to be several times slower than fp16",
}


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` is bf16, fp16 or fp32; ``reason`` says why, in words."""

    requested: str
    name: str
    device: str
    reason: str
    warning: str | None = None

    @property
    def dtype_name(self) -> str:
        return _DTYPE_NAMES[self.name]

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def mixed_precision(self) -> str:
        """accelerate's ``mixed_precision`` value (``no`` for fp32)."""
        return _ACCELERATE[self.name]

    @property
    def autocast(self) -> bool:
        return self.name != "fp32"

    def describe(self) -> str:
        return f"precision {self.name} (requested {self.requested}; {self.reason})"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(device: str) -> bool:
    """True where bf16 matrix work runs in hardware: CUDA ``is_bf16_supported``; on a CPU oneDNN's own
    check (which follows ``ONEDNN_MAX_CPU_ISA``), else the ISA flags."""
    import torch

    if device == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is not None and torch.backends.mkldnn.is_available():
        return bool(check())
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def native_fp16(device: str) -> bool:
    import torch

    if device == "cuda":
        return bool(torch.cuda.is_available())
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", None)
    if check is not None and torch.backends.mkldnn.is_available():
        return bool(check())
    return bool(_cpu_flags() & {"avx512_fp16", "amx_fp16"})


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve(requested: str = "auto", device: str | None = None) -> Precision:
    """The precision to compute in on ``device`` (``cpu`` / ``cuda``; default: CUDA when present)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    device = device or default_device()
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    where = "the GPU" if kind == "cuda" else "this CPU"
    if requested == "auto":
        if native_bf16(kind):
            return Precision(requested, "bf16", kind, f"{where} has native bf16")
        if kind == "cuda":
            return Precision(requested, "fp16", kind, f"{where} has no native bf16; fp16 instead")
        return Precision(requested, "fp32", kind, f"{where} has no native bf16 kernels (AVX-512-BF16/AMX)")
    if requested == "fp32":
        return Precision(requested, "fp32", kind, "as configured")
    native = native_bf16(kind) if requested == "bf16" else native_fp16(kind)
    if native:
        return Precision(requested, requested, kind, f"as configured; {where} runs it natively")
    warning = f"warning: precision {requested} was asked for, but {_SLOWDOWN[(kind, requested)]}; " \
              f"set precision: auto to let the hardware choose"
    return Precision(requested, requested, kind, f"as configured; {where} emulates it", warning)


def hardware_summary() -> str:
    """One line naming the hardware a figure came from: CPU model, cores, ISA flags that matter, GPU."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = _cpu_flags()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16") if f in flags]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [f"CPU {model}, {cores} cores, ISA {' '.join(isa) or 'unknown'}",
             f"native bf16 {'yes' if native_bf16('cpu') else 'no'}"]
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
    if limit:
        parts.append(f"ONEDNN_MAX_CPU_ISA={limit}")
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)} (bf16 {'yes' if native_bf16('cuda') else 'no'})")
    else:
        parts.append("no GPU")
    parts.append(f"torch {torch.__version__}")
    return "; ".join(parts)
