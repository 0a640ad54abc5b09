"""`tiny:<arch>` names: small random models of the `full` profile's real architectures, built locally and
seeded so that two builds are byte-identical."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest

from gpu_jobs.models import tiny
from gpu_jobs.models.loading import resolve_model


def _files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_builds_are_byte_identical_and_cached(tmp_path, monkeypatch):
    built = {}
    for cache in ("a", "b"):
        monkeypatch.setenv("ARENA_MODEL_CACHE", str(tmp_path / cache))
        built[cache] = {arch: Path(resolve_model(f"tiny:{arch}")) for arch in tiny.architectures()}
    for arch in tiny.architectures():
        a, b = built["a"][arch], built["b"][arch]
        assert a.parent == tmp_path / "a" and a.name == b.name == tiny.cache_name(arch)
        files_a, files_b = _files(a), _files(b)
        assert set(files_a) == set(files_b) and {"config.json", "model.safetensors", "tokenizer.json"} <= set(files_a)
        for name in files_a:
            assert filecmp.cmp(files_a[name], files_b[name], shallow=False), f"{arch}: {name} differs"
    # second resolution: the cached folder, untouched
    stamp = (built["b"]["llama3"] / "model.safetensors").stat().st_mtime_ns
    assert Path(resolve_model("tiny:llama3")) == built["b"]["llama3"]
    assert (built["b"]["llama3"] / "model.safetensors").stat().st_mtime_ns == stamp


def test_tiny_models_keep_the_real_architectural_options(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    monkeypatch.setenv("ARENA_MODEL_CACHE", str(tmp_path))
    gemma = AutoConfig.from_pretrained(resolve_model("tiny:gemma2"))
    assert gemma.model_type == "gemma2" and gemma.attn_logit_softcapping == 50.0 and gemma.final_logit_softcapping == 30.0
    assert gemma.layer_types == ["sliding_attention", "full_attention"] and gemma.sliding_window == 32
    assert gemma.tie_word_embeddings and gemma.num_key_value_heads < gemma.num_attention_heads
    assert gemma.query_pre_attn_scalar == gemma.head_dim

    llama = AutoConfig.from_pretrained(resolve_model("tiny:llama3"))
    assert llama.model_type == "llama" and not llama.tie_word_embeddings
    assert llama.num_key_value_heads == 2 and llama.num_attention_heads == 4  # GQA
    assert llama.rope_parameters["rope_theta"] == 500000.0

    deberta = AutoConfig.from_pretrained(resolve_model("tiny:deberta-v3"))
    assert deberta.model_type == "deberta-v2" and deberta.relative_attention
    assert deberta.pos_att_type == ["p2c", "c2p"] and not deberta.position_biased_input

    for arch, config in (("gemma2", gemma), ("llama3", llama), ("deberta-v3", deberta)):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(f"tiny:{arch}"))
        assert config.vocab_size == len(tokenizer)  # vocabulary sized to the real tokenizer
        assert config.pad_token_id == tokenizer.pad_token_id is not None
        assert 2 <= config.num_hidden_layers <= 4 and 64 <= config.hidden_size <= 128
        saved = json.loads((Path(resolve_model(f"tiny:{arch}")) / "config.json").read_text())["architectures"]
        assert saved == [tiny.SPECS[arch]["model_class"]]


def test_unknown_tiny_name_says_which_exist():
    with pytest.raises(ValueError, match="tiny:gemma2"):
        resolve_model("tiny:gpt5")
