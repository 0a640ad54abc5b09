"""One dataclass config per model family, loaded from YAML with dotted overrides and validated up front.

    cfg = load_config("gpu_jobs/configs/cross_encoder_minilm.yaml", ["training.lr=2e-4", "tta=true"])
    cfg.to_dict()   # full resolved config: saved as model/config.yaml and logged as params

Every problem (unknown key, wrong type, impossible value) raises ``ValueError`` naming the YAML file and
the dotted key, before any model is loaded. Override values are parsed as YAML (``1e-4`` -> float,
``true`` -> bool, ``null`` -> None, ``[q_proj, v_proj]`` -> list).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpu_jobs.precision import PRECISIONS

try:  # the neural families must not depend on the features module (its own dependencies, its own bugs)
    from gpu_jobs.models.features import FeaturesConfig

    _FEATURES_ERROR = ""
except Exception as exc:  # noqa: BLE001  # pragma: no cover
    FeaturesConfig = None  # type: ignore[assignment,misc]
    _FEATURES_ERROR = f"{type(exc).__name__}: {exc}"

FAMILIES = ("cross_encoder", "llm_classifier", "features", "reward_model", "bi_encoder")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")  # auto: the job's resolved precision


@dataclass
class TrainingConfig:
    max_length: int = 512
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    head_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.01
    warmup_steps: int = 10
    scheduler: str = "cosine"
    optimizer: str = "adamw"  # the recipe's paged AdamW 8-bit is "paged_adamw_8bit" (bitsandbytes, GPU)
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    attention_dropout: float | None = 0.0  # None: keep the checkpoint's value
    group_by_length: bool = True
    swap_augment: bool = False  # also train on every row with A and B swapped
    max_train_rows: int | None = None  # seeded subsample of the training rows (smoke runs)
    checkpoint_every_steps: int | None = None  # resumable checkpoints in OUT.ckpt/ every N optimiser steps


@dataclass
class InferenceConfig:
    max_length: int = 512
    batch_size: int = 16


@dataclass
class TextConfig:
    truncation_side: str = "left"  # left: drop the earliest turns first; right: drop the latest
    max_chars_per_part: int = 0  # pre-tokenisation cut per part (0: 12 x max_length characters)


@dataclass
class LoraSection:
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class QuantizationSection:
    load_in_4bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    compute_dtype: str = "auto"


@dataclass
class _NeuralConfig:
    family: str = ""
    name: str = ""
    model_name: str = ""
    seed: int = 42
    tta: bool = False
    # auto | bf16 | fp16 | fp32: autocast for training and prediction, resolved against the hardware by
    # gpu_jobs.precision (auto = the fastest precision it runs natively)
    precision: str = "auto"
    training: TrainingConfig = field(default_factory=TrainingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, source: str) -> None:
        t = self.training
        checks = [
            ("model_name", bool(self.model_name), "must name a model (pypi:<package>, hub id or local path)"),
            ("precision", self.precision in PRECISIONS, f"must be one of {PRECISIONS}"),
            ("training.max_length", t.max_length >= 16, "must be >= 16"),
            ("training.epochs", t.epochs >= 1, "must be >= 1"),
            ("training.batch_size", t.batch_size >= 1, "must be >= 1"),
            ("training.grad_accum", t.grad_accum >= 1, "must be >= 1"),
            ("training.lr", t.lr > 0, "must be > 0"),
            ("training.head_lr", t.head_lr is None or t.head_lr > 0, "must be > 0 or null"),
            ("training.weight_decay", t.weight_decay >= 0, "must be >= 0"),
            ("training.warmup_steps", t.warmup_steps >= 0, "must be >= 0"),
            ("training.scheduler", t.scheduler in SCHEDULERS, f"must be one of {SCHEDULERS}"),
            ("training.optimizer", t.optimizer in OPTIMIZERS, f"must be one of {OPTIMIZERS}"),
            ("training.max_grad_norm", t.max_grad_norm > 0, "must be > 0"),
            ("training.attention_dropout", t.attention_dropout is None or 0 <= t.attention_dropout < 1,
             "must be in [0, 1) or null"),
            ("training.max_train_rows", t.max_train_rows is None or t.max_train_rows >= 1, "must be >= 1 or null"),
            ("training.checkpoint_every_steps", t.checkpoint_every_steps is None or t.checkpoint_every_steps >= 1,
             "must be >= 1 or null"),
            ("inference.max_length", self.inference.max_length >= 16, "must be >= 16"),
            ("inference.batch_size", self.inference.batch_size >= 1, "must be >= 1"),
            ("text.truncation_side", self.text.truncation_side in ("left", "right"), "must be 'left' or 'right'"),
            ("text.max_chars_per_part", self.text.max_chars_per_part >= 0, "must be >= 0"),
        ]
        for key, ok, what in checks:
            if not ok:
                raise ValueError(_where(source, key) + f" {what}, got {_get(self, key)!r}")


@dataclass
class WindowSection:
    """Sliding windows per part (gpu_jobs/models/windowed.py); a window is training/inference.max_length long."""
    stride: int = 192  # tokens between window starts (max_length - stride tokens of overlap)
    max_windows: int = 4  # per part; a longer part keeps its last windows (truncation_side left) or first


@dataclass
class CrossEncoderConfig(_NeuralConfig):
    family: str = "cross_encoder"
    window: WindowSection | None = None  # null (default): one tagged sequence per row, cut to max_length

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.window is not None:
            for key, ok, what in [("window.stride", self.window.stride >= 1, "must be >= 1"),
                                  ("window.max_windows", self.window.max_windows >= 1, "must be >= 1")]:
                if not ok:
                    raise ValueError(_where(source, key) + f" {what}, got {_get(self, key)!r}")


@dataclass
class LLMClassifierConfig(_NeuralConfig):
    family: str = "llm_classifier"
    lora: LoraSection | None = field(default_factory=LoraSection)  # null: full fine-tuning
    quantization: QuantizationSection = field(default_factory=QuantizationSection)

    def validate(self, source: str) -> None:
        super().validate(source)
        q = self.quantization
        if self.lora is not None:
            lo = self.lora
            for key, ok, what in [
                ("lora.r", lo.r >= 1, "must be >= 1"),
                ("lora.alpha", lo.alpha >= 1, "must be >= 1"),
                ("lora.dropout", 0 <= lo.dropout < 1, "must be in [0, 1)"),
                ("lora.target_modules", len(lo.target_modules) > 0, "must list at least one module"),
            ]:
                if not ok:
                    raise ValueError(_where(source, key) + f" {what}, got {_get(self, key)!r}")
        if q.load_in_4bit and self.lora is None:
            raise ValueError(_where(source, "quantization.load_in_4bit") +
                             " 4-bit weights cannot be trained without LoRA; set a `lora:` section or load_in_4bit: false")
        if q.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(_where(source, "quantization.bnb_4bit_quant_type") + f" must be 'nf4' or 'fp4', got {q.bnb_4bit_quant_type!r}")
        if q.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(_where(source, "quantization.compute_dtype") + f" must be one of {COMPUTE_DTYPES}, got {q.compute_dtype!r}")


# ---- the siamese families (issue #16): each side (prompt, response) read on its own by a shared encoder
POOLINGS = ("mean", "cls")


@dataclass
class PretrainSection:
    """Reward pre-training on within-prompt answer pairs (gpu_jobs/models/reward_model.py, ``pretrain``)."""
    data: str = ""  # answers parquet: question_id, prompt, response, judge_score (e.g. arena_bench_answers)
    epochs: int = 1
    lr: float | None = None  # None: training.lr (the head gets training.head_lr as in fine-tuning)
    batch_size: int | None = None  # None: training.batch_size
    max_length: int | None = None  # None: training.max_length
    max_pairs: int | None = None  # seeded subsample of the pairs (None: all ~30k of arena_bench_answers)
    score_scale: float = 1.0  # soft target P(first beats second) = sigmoid((score_1 - score_2) / score_scale)
    warmup_steps: int = 10


@dataclass
class RewardModelConfig(_NeuralConfig):
    family: str = "reward_model"
    pooling: str = "mean"  # mean | cls: how a side's token states become one vector
    tie_log_nu_init: float = 0.0  # Davidson tie parameter log(nu) at the start (0: P(tie) = 1/3 when r_A = r_B)
    pretrain: PretrainSection | None = None  # null (default): no pre-training stage

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.pooling not in POOLINGS:
            raise ValueError(_where(source, "pooling") + f" must be one of {POOLINGS}, got {self.pooling!r}")
        pt = self.pretrain
        if pt is not None:
            for key, ok, what in [
                ("pretrain.data", bool(pt.data), "must name an answers parquet"),
                ("pretrain.epochs", pt.epochs >= 1, "must be >= 1"),
                ("pretrain.lr", pt.lr is None or pt.lr > 0, "must be > 0 or null"),
                ("pretrain.batch_size", pt.batch_size is None or pt.batch_size >= 1, "must be >= 1 or null"),
                ("pretrain.max_length", pt.max_length is None or pt.max_length >= 16, "must be >= 16 or null"),
                ("pretrain.max_pairs", pt.max_pairs is None or pt.max_pairs >= 1, "must be >= 1 or null"),
                ("pretrain.score_scale", pt.score_scale > 0, "must be > 0"),
                ("pretrain.warmup_steps", pt.warmup_steps >= 0, "must be >= 0"),
            ]:
                if not ok:
                    raise ValueError(_where(source, key) + f" {what}, got {_get(self, key)!r}")


@dataclass
class BiEncoderConfig(_NeuralConfig):
    family: str = "bi_encoder"
    pooling: str = "mean"
    head_hidden: int = 256  # hidden units of the win and tie MLPs
    head_dropout: float = 0.1

    def validate(self, source: str) -> None:
        super().validate(source)
        for key, ok, what in [
            ("pooling", self.pooling in POOLINGS, f"must be one of {POOLINGS}"),
            ("head_hidden", self.head_hidden >= 1, "must be >= 1"),
            ("head_dropout", 0 <= self.head_dropout < 1, "must be in [0, 1)"),
        ]:
            if not ok:
                raise ValueError(_where(source, key) + f" {what}, got {_get(self, key)!r}")


FAMILY_CLASSES: dict[str, type] = {"cross_encoder": CrossEncoderConfig, "llm_classifier": LLMClassifierConfig,
                                   "reward_model": RewardModelConfig, "bi_encoder": BiEncoderConfig}


# --------------------------------------------------------------------------------------------- loading
def _where(source: str, key: str) -> str:
    return f"{source}: key '{key}':"


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _check_value(value: Any, tp: Any, source: str, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints are accepted where floats are)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, source, key)
            except ValueError as exc:
                errors.append(exc)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(_where(source, key) + f" must be a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, source, prefix=key + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(_where(source, key) + f" must be a list, got {type(value).__name__} {value!r}")
        return [_check_value(v, item_tp, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(_where(source, key) + f" must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(_where(source, key) + f" must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ValueError(_where(source, key) + f" must be a {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # programming error, not a user error


# keys that were renamed: a config that still uses one gets told the new name
RENAMED = {"training.bf16": "the top-level key 'precision' (auto | bf16 | fp16 | fp32; auto asks the hardware)"}
# written by the job next to the resolved config (what the hardware made of it); ignored when read back
RESOLVED_KEY = "resolved"


def _build(cls: type, data: dict, source: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if prefix + str(key) in RENAMED:
            raise ValueError(_where(source, prefix + str(key)) + f" was replaced by {RENAMED[prefix + str(key)]}")
        if key not in names:
            raise ValueError(_where(source, prefix + str(key)) + f" unknown key; known keys here: {sorted(names)}")
    kwargs = {k: _check_value(v, hints[k], source, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str], source: str) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"{source}: override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ValueError(_where(source, key) + f" override value {raw!r} is not valid YAML: {exc}") from exc
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ValueError(_where(source, key) + f" '{part}' is not a section")
            node = node[part]
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict, source: str = "<config>"):
    """Build and validate the family's config object from a plain dict (YAML contents)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: the config must be a YAML mapping, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if k != RESOLVED_KEY}
    family = data.get("family")
    if family not in FAMILIES:
        raise ValueError(_where(source, "family") + f" unknown family {family!r}; choose one of {FAMILIES}")
    if family == "features":
        data = _drop_checkpoint_setting(data, source)
        if FeaturesConfig is None:
            raise ValueError(_where(source, "family") + " the features family cannot be imported "
                             f"(gpu_jobs/models/features.py): {_FEATURES_ERROR}")
        try:
            return FeaturesConfig.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from exc
    cfg = _build(FAMILY_CLASSES[family], data, source)
    cfg.validate(source)
    return cfg


def _drop_checkpoint_setting(data: dict, source: str) -> dict:
    """The features family fits in seconds: ``training.checkpoint_every_steps`` is accepted (checked) and ignored."""
    training = data.get("training")
    if not isinstance(training, dict) or "checkpoint_every_steps" not in training:
        return data
    training = dict(training)
    _check_value(training.pop("checkpoint_every_steps"), int | None, source, "training.checkpoint_every_steps")
    return {**data, "training": training}


def load_config(path: str | Path, overrides: list[str] | None = None):
    """Read a YAML config, apply ``key.sub=value`` overrides, validate; returns the family's config object."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: config file not found")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a YAML mapping, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [], str(path))
    data.setdefault("name", path.stem)
    return config_from_dict(data, str(path))


def config_to_dict(cfg) -> dict[str, Any]:
    """Full resolved config of any family (the features config may not be a plain dataclass)."""
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return dataclasses.asdict(cfg)


def save_config(cfg, path: Path, resolved: dict | None = None) -> None:
    """The resolved config; ``resolved`` (e.g. the precision the hardware gave) is written under
    ``resolved:`` and ignored when the file is read back."""
    data = config_to_dict(cfg)
    if resolved:
        data[RESOLVED_KEY] = resolved
    with open(path, "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
