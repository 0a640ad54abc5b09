"""Quantised inference: load a trained model directory with its weights in 8 (or 4) bits.

    from gpu_jobs.quantize import plan, load_quantized
    plan("cross_encoder", "int8", "cpu")     # -> {"mode": "int8", "method": "torch.ao dynamic int8", ...}
    cfg, model, tokenizer, record = load_quantized("OUT/model", "int8", torch.device("cpu"))

Modes (``QUANTIZE_MODES``):
- ``none``: full precision (the model's own dtype; autocast as the job's precision resolves).
- ``int8``: on a CPU, PyTorch dynamic int8 (``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear``:
  weights stored as qint8 per tensor, activations quantised per batch, everything else fp32) for the encoder
  members (cross-encoder MiniLM / DeBERTa). Decoders on a CPU stay in full precision: per-tensor dynamic int8
  moved a SmolLM2 classifier's probabilities by up to 0.115 (activation outliers, what LLM.int8 exists for).
  On CUDA, decoders (``llm_classifier``) load their base with bitsandbytes LLM.int8 (``load_in_8bit``) and the
  adapter on top; encoders on CUDA stay in full precision (dynamic int8 has CPU kernels only).
- ``int4``: bitsandbytes 4-bit NF4 with double quantisation for decoders on CUDA. Elsewhere there is no 4-bit
  path that is faster than int8, so it falls back to the ``int8`` method and the record says so.
The bitsandbytes paths are selected only when CUDA is available; they are not exercised on the CPU machines.

Every load returns a ``record`` (a small dict: mode asked, method used, device, reason) that the predict job
writes next to its output and the predictor bundle keeps in its manifest.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from gpu_jobs.models.registry import get_family

QUANTIZE_MODES = ("none", "int8", "int4")
DYNAMIC_INT8 = "torch.ao dynamic int8 (nn.Linear weights qint8, per-batch activation scales, rest fp32)"
BNB_INT8 = "bitsandbytes LLM.int8 (load_in_8bit) base + adapter"
BNB_NF4 = "bitsandbytes 4-bit NF4, double quant (load_in_4bit) base + adapter"
DECODER_FAMILIES = ("llm_classifier",)


def _check_mode(mode: str) -> str:
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize={mode!r}: expected one of {', '.join(QUANTIZE_MODES)}")
    return mode


def plan(family: str, mode: str, device_type: str) -> dict:
    """How a member of ``family`` is quantised under ``mode`` on ``device_type`` ("cpu"/"cuda"): a record."""
    mode = _check_mode(mode)
    record = {"mode": mode, "family": family, "device": device_type}
    if mode == "none":
        return {**record, "method": "none", "reason": "full precision asked"}
    if not get_family(family).neural:
        return {**record, "method": "none", "reason": f"the {family} family has no neural weights"}
    if not getattr(get_family(family), "quantizable", True):  # e.g. dpo: scores with its adapter on and off
        return {**record, "method": "none", "reason": f"the {family} family predicts as trained "
                f"({get_family(family).quantizable_reason})"}
    if device_type == "cuda":
        if family in DECODER_FAMILIES:
            return {**record, "method": BNB_NF4 if mode == "int4" else BNB_INT8, "reason": "decoder on CUDA"}
        return {**record, "method": "none",
                "reason": "dynamic int8 has CPU kernels only; an encoder on CUDA runs in full precision"}
    if family in DECODER_FAMILIES:
        return {**record, "method": "none", "reason": "decoders are quantised with bitsandbytes on CUDA only; "
                "per-tensor dynamic int8 moves a decoder's probabilities too far (up to 0.115 measured)"}
    reason = "CPU: dynamic int8 on nn.Linear"
    if mode == "int4":
        reason = "4-bit (bitsandbytes) is selected only on CUDA; on a CPU int4 falls back to dynamic int8"
    return {**record, "method": DYNAMIC_INT8, "reason": reason}


def dynamic_int8(model):
    """``model`` with every ``nn.Linear`` replaced by a dynamically quantised int8 one (CPU, eval mode)."""
    import torch
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao eager quantisation is deprecated in favour of torchao (not pinned here)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model.float().eval(), {torch.nn.Linear}, dtype=torch.qint8)


def _bnb_decoder(model_dir: Path, cfg, device, bits: int):
    """A trained ``llm_classifier`` directory loaded with its base in bitsandbytes 8- or 4-bit. ``load_quantized``
    picks it only on CUDA; bitsandbytes 0.50 also runs 4-bit on a CPU (slowly), which the tests use."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    from gpu_jobs.models.llm_classifier import LABELS, load_tokenizer
    from gpu_jobs.models.loading import resolve_model
    from gpu_jobs.precision import resolve

    compute = resolve("auto", device.type).dtype  # bf16 where the device has it
    quant = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
             BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute))
    tokenizer = load_tokenizer(model_dir)
    source = model_dir if cfg.lora is None else resolve_model(cfg.model_name)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, dtype=compute,
        quantization_config=quant, device_map={"": str(device)})
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.lora is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, model_dir)  # adapter + fp head over the quantised base
    return model.eval(), tokenizer


def load_quantized(model_dir: str | Path, mode: str, device=None):
    """(cfg, model, tokenizer, record): the model directory loaded for prediction under ``mode``."""
    import torch

    from gpu_jobs import predict as P

    model_dir = Path(model_dir)
    device = device or P.default_device()
    cfg = P.load_model_config(model_dir)
    record = plan(cfg.family, mode, device.type)
    if record["method"] in (BNB_INT8, BNB_NF4):
        model, tokenizer = _bnb_decoder(model_dir, cfg, device, 8 if record["method"] == BNB_INT8 else 4)
        return cfg, model, tokenizer, record
    if record["method"] == DYNAMIC_INT8:
        quantisation = getattr(cfg, "quantization", None)
        if quantisation is not None and quantisation.load_in_4bit:  # QLoRA: the base is 4-bit already
            record = {**record, "method": "none", "reason": "trained on a bitsandbytes 4-bit base (QLoRA); its "
                      "adapter is not merged, so the model predicts as trained"}
        else:
            cfg, model, tokenizer = P.load_model(model_dir, torch.device("cpu"))
            return cfg, dynamic_int8(model), tokenizer, record
    cfg, model, tokenizer = P.load_model(model_dir, device)
    return cfg, model, tokenizer, record


def size_mb(model) -> float:
    """Bytes of the model's state (parameters, buffers and packed int8 weights), in MB."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 1e6
