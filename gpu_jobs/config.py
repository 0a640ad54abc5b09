"""Typed job configs: one pydantic model per model family, loaded from YAML with overrides, validated up front.

    cfg = load_config("gpu_jobs/configs/cross_encoder_minilm.yaml", ["training.lr=2e-4", "tta=true"])
    cfg = load_config("gpu_jobs/configs/cross_encoder_minilm.yaml", {"training": {"lr": 2e-4}})  # same
    cfg.to_dict()   # full resolved config: saved as model/config.yaml and logged as params

Every problem (unknown key, wrong type, impossible value) raises ``ValueError`` naming the YAML file and
the dotted key (``<file>: key 'training.lr': ...``), before any model is loaded: pydantic's
``ValidationError`` locations are turned into that form by :func:`validate_model`. Override values given as
``key.sub=value`` strings (the jobs' ``--set``) are parsed as YAML (``1e-4`` -> float, ``true`` -> bool,
``null`` -> None, ``[q_proj, v_proj]`` -> list); a mapping of overrides is deep-merged as it is.

Which config class a file gets is decided by its ``family`` key through the family registry
(``gpu_jobs.models.registry``); the classes of the neural families live here, the ``features`` family's in
``gpu_jobs/models/features.py``. Types are strict (no ``"3"`` for an int, no ``1`` for a bool); a float
accepts an int and a numeric string (YAML 1.1 reads ``1e-4`` without a dot as a string).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, model_validator

from gpu_jobs.models.attention import ATTENTION
from gpu_jobs.precision import PRECISIONS


# --------------------------------------------------------------------------------------------- types
def _number(value: Any) -> Any:
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


Float = Annotated[float, BeforeValidator(_number), Strict()]
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")  # auto: the job's resolved precision

# keys that were renamed: a config that still uses one gets told the new name
RENAMED = {"training.bf16": "the top-level key 'precision' (auto | bf16 | fp16 | fp32; auto asks the hardware)"}
# written by the job next to the resolved config (what the hardware made of it); ignored when read back
RESOLVED_KEY = "resolved"


class ConfigKeyError(ValueError):
    """A cross-field problem raised inside a validator, naming its key (relative to the model raising it)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


class Section(BaseModel):
    """A YAML mapping: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class JobConfig(Section):
    """What every family's config has; ``family`` selects the class (``gpu_jobs.models.registry``)."""

    family: str
    name: Str = ""
    seed: Int = 42
    tta: Bool = False

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Any, source: str = "<config>", key_prefix: str = ""):
        return validate_model(cls, data, source, key_prefix)


# --------------------------------------------------------------------------------------------- neural families
class TrainingConfig(Section):
    max_length: Int = Field(512, ge=16)
    epochs: Int = Field(1, ge=1)
    batch_size: Int = Field(8, ge=1)
    grad_accum: Int = Field(1, ge=1)
    lr: Float = Field(1e-4, gt=0)
    head_lr: Float | None = Field(None, gt=0)  # None: same as lr
    weight_decay: Float = Field(0.01, ge=0)
    warmup_steps: Int = Field(10, ge=0)
    scheduler: Literal[SCHEDULERS] = "cosine"  # type: ignore[valid-type]
    # the recipe's paged AdamW 8-bit is "paged_adamw_8bit" (bitsandbytes, GPU)
    optimizer: Literal[OPTIMIZERS] = "adamw"  # type: ignore[valid-type]
    max_grad_norm: Float = Field(1.0, gt=0)
    gradient_checkpointing: Bool = False
    attention_dropout: Float | None = Field(0.0, ge=0, lt=1)  # None: keep the checkpoint's value
    group_by_length: Bool = True
    swap_augment: Bool = False  # also train on every row with A and B swapped
    max_train_rows: Int | None = Field(None, ge=1)  # seeded subsample of the training rows (smoke runs)
    checkpoint_every_steps: Int | None = Field(None, ge=1)  # resumable checkpoints in OUT.ckpt/ every N steps
    # score the validation fold every N optimiser steps (Pipes message kind "val", metrics.json val_curve): what
    # HPO prunes on; costs one prediction pass over the fold each time
    eval_every_steps: Int | None = Field(None, ge=1)


class InferenceConfig(Section):
    max_length: Int = Field(512, ge=16)
    batch_size: Int = Field(16, ge=1)


class TextConfig(Section):
    truncation_side: Literal["left", "right"] = "left"  # left: drop the earliest turns first; right: the latest
    max_chars_per_part: Int = Field(0, ge=0)  # pre-tokenisation cut per part (0: 12 x max_length characters)


class LoraSection(Section):
    r: Int = Field(64, ge=1)
    alpha: Int = Field(16, ge=1)
    dropout: Float = Field(0.05, ge=0, lt=1)
    target_modules: list[Str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1)


class QuantizationSection(Section):
    load_in_4bit: Bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: Bool = True
    compute_dtype: Literal[COMPUTE_DTYPES] = "auto"  # type: ignore[valid-type]


class NeuralConfig(JobConfig):
    """The shared config of the families trained by the shared accelerate loop (``gpu_jobs.train``)."""

    model_name: Str = Field(min_length=1)  # pypi:<package>, hub id, tiny:<arch> or local path
    tta: Bool = False
    # auto | bf16 | fp16 | fp32: autocast for training and prediction, resolved against the hardware by
    # gpu_jobs.precision (auto = the fastest precision it runs natively)
    precision: Literal[PRECISIONS] = "auto"  # type: ignore[valid-type]
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    text: TextConfig = Field(default_factory=TextConfig)


class WindowSection(Section):
    """Sliding windows per part (``gpu_jobs/models/windowed.py``); a window is training/inference.max_length long."""

    stride: Int = Field(192, ge=1)  # tokens between window starts (max_length - stride tokens of overlap)
    max_windows: Int = Field(4, ge=1)  # per part; a longer part keeps its last windows (truncation_side left) or first


class CrossEncoderConfig(NeuralConfig):
    family: Literal["cross_encoder"] = "cross_encoder"
    window: WindowSection | None = None  # null (default): one tagged sequence per row, cut to max_length


class DecoderConfig(NeuralConfig):
    """What the decoder families (``llm_classifier``, ``dpo``) share: attention kernel, LoRA, 4-bit base."""

    # auto | eager | sdpa | flash_attention_2, resolved by gpu_jobs.models.attention for the device and dtype
    attn_implementation: Literal[ATTENTION] = "auto"  # type: ignore[valid-type]
    lora: LoraSection | None = Field(default_factory=LoraSection)  # null: full fine-tuning
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)

    @model_validator(mode="after")
    def _four_bit_needs_lora(self):
        if self.quantization.load_in_4bit and self.lora is None:
            raise ConfigKeyError("quantization.load_in_4bit", "4-bit weights cannot be trained without LoRA; set a "
                                 "`lora:` section or load_in_4bit: false")
        return self


class LLMClassifierConfig(DecoderConfig):
    family: Literal["llm_classifier"] = "llm_classifier"


class DPOSection(Section):
    """The ``dpo`` family's own settings (``gpu_jobs/models/dpo.py``)."""

    beta: Float = Field(0.1, gt=0)  # DPO temperature: the implicit reward is beta * log(pi / pi_ref)
    # ties in the DPO loss: drop (default: left out of the loss, kept for the calibration, which fits the tie
    # parameter) | half (a tie is a pair whose target P(A preferred to B) is 1/2: it pulls the margin to 0)
    ties: Literal["drop", "half"] = "drop"
    # share of the training rows (whole prompt groups, seeded) kept out of the DPO loss to fit the 3-class
    # calibration on; 0: fit it on the margins of the rows the policy was trained on (over-confident)
    calibration_fraction: Float = Field(0.2, ge=0, lt=1)


class DPOConfig(DecoderConfig):
    family: Literal["dpo"] = "dpo"
    # the reference model is the base with the adapter switched off: a LoRA adapter is required
    lora: LoraSection = Field(default_factory=LoraSection)
    # conversations are cut at their end (gpu_jobs.sft.encode_conversation): only "right" is honoured
    text: TextConfig = Field(default_factory=lambda: TextConfig(truncation_side="right"))
    dpo: DPOSection = Field(default_factory=DPOSection)

    @model_validator(mode="after")
    def _dpo_settings(self):
        if self.text.truncation_side != "right":
            raise ConfigKeyError("text.truncation_side", "the dpo family cuts each conversation at its end (the "
                                 "chat template's turns in order); set truncation_side: right")
        if self.training.eval_every_steps is not None:
            raise ConfigKeyError("training.eval_every_steps", "the dpo member's probabilities come from the "
                                 "calibration fitted after training, so the validation fold cannot be scored "
                                 "mid-run; leave it null (training.checkpoint_every_steps and --stop-file work)")
        if self.training.swap_augment:
            raise ConfigKeyError("training.swap_augment", "a swapped pair gives the dpo loss the same term "
                                 "(the margin is antisymmetric): swap_augment would only double the work")
        return self


# the siamese families: each side (prompt, response) read on its own by a shared encoder
POOLINGS = ("mean", "cls")  # how a side's token states become one vector


class PretrainSection(Section):
    """Reward pre-training on within-prompt answer pairs (``gpu_jobs.models.reward_model.pretrain``)."""

    data: Str = Field(min_length=1)  # answers parquet: question_id, prompt, response, judge_score
    epochs: Int = Field(1, ge=1)
    lr: Float | None = Field(None, gt=0)  # None: training.lr (the head gets training.head_lr as in fine-tuning)
    batch_size: Int | None = Field(None, ge=1)  # None: training.batch_size
    max_length: Int | None = Field(None, ge=16)  # None: training.max_length
    max_pairs: Int | None = Field(None, ge=1)  # seeded subsample of the pairs (None: all ~30k of arena_bench_answers)
    score_scale: Float = Field(1.0, gt=0)  # soft target P(first beats second) = sigmoid(score gap / score_scale)
    warmup_steps: Int = Field(10, ge=0)


class RewardModelConfig(NeuralConfig):
    family: Literal["reward_model"] = "reward_model"
    pooling: Literal[POOLINGS] = "mean"  # type: ignore[valid-type]
    tie_log_nu_init: Float = 0.0  # Davidson tie parameter log(nu) at the start (0: P(tie) = 1/3 when r_A = r_B)
    pretrain: PretrainSection | None = None  # null (default): no pre-training stage


class BiEncoderConfig(NeuralConfig):
    family: Literal["bi_encoder"] = "bi_encoder"
    pooling: Literal[POOLINGS] = "mean"  # type: ignore[valid-type]
    head_hidden: Int = Field(256, ge=1)  # hidden units of the win and tie MLPs
    head_dropout: Float = Field(0.1, ge=0, lt=1)


# --------------------------------------------------------------------------------------------- errors
def _where(source: str, key: str) -> str:
    return f"{source}: key '{key}':"


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _known_keys(cls: type, loc: tuple) -> list[str] | None:
    """The keys a model accepts at ``loc`` (the mapping holding the unknown key), when it can be found."""
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is None:
            return None
    return sorted(cls.model_fields) if hasattr(cls, "model_fields") else None


def describe_errors(exc: ValidationError, cls: type, source: str, key_prefix: str = "") -> str:
    """One line per problem: ``<source>: key '<dotted>': <what>, got <value>``."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigKeyError):
            key, what = _dotted(loc + tuple(cause.key.split("."))), cause.message
            lines.append(f"{_where(source, key_prefix + key)} {what}")
            continue
        key = key_prefix + _dotted(loc)
        if err["type"] == "extra_forbidden":
            known = _known_keys(cls, loc[:-1])
            lines.append(f"{_where(source, key)} unknown key" + (f"; known keys here: {known}" if known else ""))
        elif err["type"] == "missing":
            lines.append(f"{_where(source, key)} required, not given")
        else:
            what = err["msg"].removeprefix("Value error, ")
            lines.append(f"{_where(source, key)} {what}, got {err.get('input')!r}")
    return "\n".join(lines)


def _check_renamed(data: Any, source: str, key_prefix: str, prefix: str = "") -> None:
    if not isinstance(data, Mapping):
        return
    for key, value in data.items():
        dotted = prefix + str(key)
        if dotted in RENAMED:
            raise ValueError(_where(source, key_prefix + dotted) + f" was replaced by {RENAMED[dotted]}")
        _check_renamed(value, source, key_prefix, dotted + ".")


def validate_model(cls: type, data: Any, source: str, key_prefix: str = ""):
    """``cls`` built from ``data``; any problem raises ``ValueError`` naming ``source`` and the dotted key."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: {key_prefix.rstrip('.') or 'the config'} must be a YAML mapping, "
                         f"got {type(data).__name__}")
    _check_renamed(data, source, key_prefix)
    try:
        return cls.model_validate(dict(data))
    except ValidationError as exc:
        raise ValueError(describe_errors(exc, cls, source, key_prefix)) from None


# --------------------------------------------------------------------------------------------- loading
def merge(base: Mapping, patch: Mapping) -> dict:
    """``base`` with ``patch`` deep-merged into it (mappings merge key by key, anything else replaces)."""
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str] | tuple[str, ...], source: str) -> dict:
    """``key.sub=value`` strings (values parsed as YAML) as one nested mapping."""
    data: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"{source}: override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ValueError(_where(source, key) + f" override value {raw!r} is not valid YAML: {exc}") from exc
        node: Any = value
        for part in reversed(key.split(".")):
            node = {part: node}
        data = merge(data, node)
    return data


def apply_overrides(data: dict, overrides, source: str) -> dict:
    """``data`` with overrides applied: ``key.sub=value`` strings or a nested mapping."""
    patch = overrides if isinstance(overrides, Mapping) else parse_overrides(list(overrides or []), source)
    for key, value in patch.items():
        if isinstance(value, Mapping) and key in data and not isinstance(data[key], Mapping) and data[key] is not None:
            raise ValueError(_where(source, key) + f" '{key}' is not a section")
    return merge(data, patch)


def config_from_dict(data: Any, source: str = "<config>", key_prefix: str = ""):
    """Build and validate the family's config object from a plain dict (YAML contents)."""
    from gpu_jobs.models.registry import FAMILIES, get_family

    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: the config must be a YAML mapping, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if k != RESOLVED_KEY}
    family = data.get("family")
    if family not in FAMILIES:
        raise ValueError(_where(source, key_prefix + "family") +
                         f" unknown family {family!r}; choose one of {tuple(FAMILIES)}")
    try:
        config_class = get_family(family).config_class
    except Exception as exc:  # noqa: BLE001  # a family module that cannot be imported is a config error here
        raise ValueError(_where(source, key_prefix + "family") + f" the {family} family cannot be imported "
                         f"({FAMILIES[family]}): {type(exc).__name__}: {exc}") from exc
    return validate_model(config_class, data, source, key_prefix)


def read_yaml(path: str | Path) -> dict:
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
    return data


def load_config(path: str | Path, overrides=None):
    """Read a YAML config, apply overrides (``key.sub=value`` strings or a nested mapping), validate;
    returns the family's config object."""
    path = Path(path)
    data = apply_overrides(read_yaml(path), overrides or [], str(path))
    data.setdefault("name", path.stem)
    return config_from_dict(data, str(path))


def config_to_dict(cfg) -> dict[str, Any]:
    """Full resolved config of any family."""
    return cfg.to_dict()


def save_config(cfg, path: Path, resolved: dict | None = None) -> None:
    """The resolved config; ``resolved`` (e.g. the precision the hardware gave) is written under
    ``resolved:`` and ignored when the file is read back."""
    data = config_to_dict(cfg)
    if resolved:
        data[RESOLVED_KEY] = resolved
    with open(path, "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
