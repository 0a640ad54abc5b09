"""Cross-encoder: an encoder (MiniLM, DeBERTa-v3) reading the whole tagged pair, with a 3-class head.

``AutoModelForSequenceClassification(num_labels=3)``; the head (``classifier``, plus DeBERTa's freshly
initialised ``pooler``) may get its own learning rate. Attention dropout is set from the config (0 is
markedly faster on CPU and costs nothing measurable on this task).

With a ``window:`` section in the config (off by default) the family reads long conversations whole through
sliding windows per part (``gpu_jobs/models/windowed.py``): a different model, batch layout and model folder.
"""

from __future__ import annotations

from pathlib import Path

from gpu_jobs.config import CrossEncoderConfig
from gpu_jobs.models.loading import resolve_model
from gpu_jobs.models.neural import NeuralFamily

HEAD_NAMES = ("classifier", "pooler", "score")
LABELS = {0: "A", 1: "B", 2: "tie"}
DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


def _model_config(path: str, attention_dropout: float | None):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    if attention_dropout is not None:
        for key in DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, attention_dropout)
    return config


def row_io(cfg):
    """The family's ``RowIO``: the sliding windows' when ``window`` is set, else None (one tagged sequence)."""
    if cfg.window is None:
        return None
    from gpu_jobs.models import windowed

    return windowed.row_io(cfg)


def build(cfg, device=None):
    """Pretrained encoder + fresh 3-class head, and its tokenizer (for training)."""
    if cfg.window is not None:
        from gpu_jobs.models import windowed

        return windowed.build(cfg)
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model(cfg.model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = _model_config(path, cfg.training.attention_dropout)
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=torch.float32)
    if cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def save(model, tokenizer, model_dir: Path) -> None:
    if not hasattr(model, "save_pretrained"):  # the windowed model: encoder folder + head.safetensors
        from gpu_jobs.models import windowed

        return windowed.save(model, tokenizer, model_dir)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def load(model_dir: Path, cfg, device=None):
    """The trained classifier from a model directory, in eval mode."""
    if cfg.window is not None:
        from gpu_jobs.models import windowed

        return windowed.load(model_dir, cfg)
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval(), tokenizer


FAMILY = NeuralFamily("cross_encoder", CrossEncoderConfig, build=build, save_fn=save, load_fn=load,
                      head_names=HEAD_NAMES, io_fn=row_io)
