"""Decoder LLM classifier: a 3-class linear head on the last non-pad token, LoRA / QLoRA via peft.

``AutoModelForSequenceClassification`` on a Llama / Gemma checkpoint is exactly that model once
``config.pad_token_id`` is set (it pools the last non-pad token). LoRA adapters go on
q,k,v,o,gate,up,down; the head (``score``) is trained fully through ``modules_to_save``. QLoRA loads the
base in 4-bit NF4 with double quantisation and a compute dtype of the job's resolved precision (bf16 where
the hardware has it), then ``prepare_model_for_kbit_training``.
The model directory holds the adapter + head (or the full weights when ``lora: null``) and the tokenizer;
the base model is found again from ``model_name`` in the saved config.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gpu_jobs.config import LLMClassifierConfig
from gpu_jobs.models.attention import resolve_attention
from gpu_jobs.models.loading import resolve_model
from gpu_jobs.models.neural import NeuralFamily
from gpu_jobs.precision import resolve

HEAD_NAMES = ("score",)
LABELS = {0: "A", 1: "B", 2: "tie"}


def load_tokenizer(path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _quantization_config(cfg, compute_dtype):
    import torch
    from transformers import BitsAndBytesConfig

    q = cfg.quantization
    if q.compute_dtype != "auto":
        compute_dtype = getattr(torch, q.compute_dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


def attention_for(cfg, path: str, device, dtype) -> tuple[str, str]:
    """The attention kernel this job loads the base with (gpu_jobs.models.attention), and why."""
    import torch
    from transformers import AutoConfig

    device_type = torch.device(device).type if device is not None else "cpu"
    model_type = getattr(AutoConfig.from_pretrained(path), "model_type", "")
    return resolve_attention(cfg.attn_implementation, model_type, device_type,
                             dtype in (torch.bfloat16, torch.float16))


def _base_model(cfg, path: str, tokenizer, device=None, causal_lm: bool = False):
    """The frozen base of ``cfg`` (dtype, attention kernel, 4-bit, attention dropout): a 3-label sequence
    classifier, or with ``causal_lm`` the language model itself (the ``dpo`` family's policy)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quantised = cfg.quantization.load_in_4bit
    precision = resolve(cfg.precision, str(device) if device is not None else None)
    # frozen base weights in the compute precision (bf16: half the memory) under LoRA or 4-bit; trainable
    # weights are cast to fp32 after wrapping
    dtype = precision.dtype if (cfg.lora is not None or quantised) else torch.float32
    kwargs = dict(dtype=dtype) if causal_lm else dict(
        num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, dtype=dtype)
    kwargs["attn_implementation"], reason = attention_for(cfg, path, device, dtype)
    print(f"{cfg.name}: attention {kwargs['attn_implementation']} ({reason})", file=sys.stderr, flush=True)
    if cfg.training.attention_dropout is not None:
        kwargs["attention_dropout"] = cfg.training.attention_dropout
    if quantised:
        kwargs["quantization_config"] = _quantization_config(cfg, precision.dtype)
        kwargs["device_map"] = {"": str(device) if device is not None else "cpu"}  # 4-bit weights load in place
    auto_class = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
    model = auto_class.from_pretrained(path, **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    return model


def wrap_lora(model, cfg, task_type: str, modules_to_save: tuple[str, ...] = ()):
    """``model`` made trainable as ``cfg`` asks: k-bit preparation (QLoRA) or gradient checkpointing, the LoRA
    adapter of ``cfg.lora`` (none when null: full fine-tuning), trainable weights in fp32."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    checkpointing = cfg.training.gradient_checkpointing
    if cfg.quantization.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora is not None:
        lora = LoraConfig(task_type=task_type, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                          lora_dropout=cfg.lora.dropout, target_modules=list(cfg.lora.target_modules),
                          modules_to_save=list(modules_to_save) or None)
        model = get_peft_model(model, lora)
    for p in model.parameters():  # optimiser state and updates in fp32
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def build(cfg, device=None):
    """Base LLM + head, wrapped with LoRA (and 4-bit base for QLoRA); returns (model, tokenizer)."""
    path = resolve_model(cfg.model_name)
    tokenizer = load_tokenizer(path)
    model = _base_model(cfg, path, tokenizer, device)
    return wrap_lora(model, cfg, "SEQ_CLS", HEAD_NAMES), tokenizer


def save(model, tokenizer, model_dir: Path) -> None:
    model.save_pretrained(model_dir)  # peft: adapter + head only
    tokenizer.save_pretrained(model_dir)


def load(model_dir: Path, cfg, device=None):
    """Base model from ``cfg.model_name`` + the saved adapter and head, in eval mode (LoRA merged when the
    base is not quantised, for speed)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model_dir = Path(model_dir)
    tokenizer = load_tokenizer(model_dir)
    if cfg.lora is None:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model.eval(), tokenizer
    from peft import PeftModel

    base = _base_model(cfg, resolve_model(cfg.model_name), tokenizer, device)
    model = PeftModel.from_pretrained(base, model_dir)
    if not cfg.quantization.load_in_4bit:
        model = model.merge_and_unload()
    return model.eval(), tokenizer


FAMILY = NeuralFamily("llm_classifier", LLMClassifierConfig, build=build, save_fn=save, load_fn=load,
                      head_names=HEAD_NAMES)
