"""Sentence embeddings of prompts and responses (a siamese / bi-encoder view of a pair).

A sentence-transformers style encoder (mean pooling over the last hidden state, L2-normalised) embeds each
text on its own, so a response is read whole up to ``max_length`` tokens whatever the length of the other
one, and each distinct text is embedded once (the same answer appears in many pairs and in the swapped
TTA pass). Used by the ``features`` family's ``embedding_model`` option.

Vectors are also kept on disk (``ARENA_EMBEDDING_CACHE``, default ``<model cache>/embeddings``), one folder
per (model, max_length), one ``.npz`` file per batch of new texts written aside and renamed: stage 2, the
LOSO evaluation and later runs read what stage 1 embedded instead of embedding it again, and concurrent
jobs never write the same file.

``gpu_jobs`` never imports ``arena_pipeline``.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import uuid
from pathlib import Path

import numpy as np

from gpu_jobs.contract.atomic import atomic_path


def _key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def embedding_cache_dir() -> Path:
    from gpu_jobs.models.loading import model_cache_dir

    return Path(os.environ.get("ARENA_EMBEDDING_CACHE") or model_cache_dir() / "embeddings")


class SentenceEmbedder:
    """Embeds texts with a transformers encoder; keeps every vector it computed, keyed by the text."""

    def __init__(self, model_name: str, max_length: int = 256, batch_size: int = 32, threads: int = 0,
                 progress: bool = True, cache_dir: Path | str | None = None, disk_cache: bool = True):
        self.model_name = model_name
        self.max_length = max_length
        self.batch_size = batch_size
        self.threads = threads
        self.progress = progress
        self._model = None
        self._tokenizer = None
        self._cache: dict[str, np.ndarray] = {}
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name).strip("_")
        root = Path(cache_dir) if cache_dir is not None else embedding_cache_dir()
        self.disk_dir = root / f"{slug}-{max_length}" if disk_cache else None
        self._disk_loaded = False

    def _load_disk(self) -> None:
        """Read every vector file of this (model, max_length); a damaged file is skipped (re-embedded)."""
        if self._disk_loaded:
            return
        self._disk_loaded = True
        if self.disk_dir is None or not self.disk_dir.is_dir():
            return
        for path in sorted(self.disk_dir.glob("*.npz")):
            try:
                with np.load(path) as stored:
                    self._cache.update(zip(stored["keys"].tolist(), stored["vectors"]))
            except Exception as err:  # noqa: BLE001 - a cache file is never worth a failed job
                print(f"embedding cache: skipping unreadable {path}: {err}", file=sys.stderr)

    def _save_disk(self, keys: list[str]) -> None:
        if self.disk_dir is None or not keys:
            return
        self.disk_dir.mkdir(parents=True, exist_ok=True)
        final = self.disk_dir / f"{uuid.uuid4().hex}.npz"
        with atomic_path(final) as partial, open(partial, "wb") as handle:  # not matched by *.npz until renamed
            np.savez(handle, keys=np.asarray(keys), vectors=np.stack([self._cache[k] for k in keys]))

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModel, AutoTokenizer

        from gpu_jobs.models.loading import resolve_model

        path = resolve_model(self.model_name)
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()

    @property
    def dim(self) -> int:
        if self._cache:  # known without loading the encoder
            return len(next(iter(self._cache.values())))
        self._load()
        return int(self._model.config.hidden_size)

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors; an empty text gets the zero vector."""
        self._load_disk()
        keys = [_key(t) if t else None for t in texts]  # each text hashed once
        new = {k: t for k, t in zip(keys, texts) if k is not None and k not in self._cache}
        if new:  # the encoder is loaded only when some text is not cached yet
            self._embed(sorted(new.items(), key=lambda item: len(item[1]), reverse=True))
            self._save_disk(list(new))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, key in enumerate(keys):
            if key is not None:
                out[i] = self._cache[key]
        return out

    def _embed(self, todo: list[tuple[str, str]]) -> None:
        """Embed (key, text) pairs, longest first (batches of similar length pad little), into the cache."""
        import torch
        from tqdm.auto import tqdm

        self._load()
        torch.set_num_threads(self.threads if self.threads > 0 else (os.cpu_count() or 1))
        bar = tqdm(total=len(todo), desc=f"embedding ({self.model_name})", unit="text", file=sys.stderr,
                   disable=not self.progress, mininterval=float(os.environ.get("TQDM_MININTERVAL", 1)))
        with torch.inference_mode():
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start:start + self.batch_size]
                batch = self._tokenizer([text for _, text in chunk], padding=True, truncation=True,
                                        max_length=self.max_length, return_tensors="pt")
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                pooled = torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)
                for (key, _), vec in zip(chunk, pooled):
                    self._cache[key] = vec
                bar.update(len(chunk))
        bar.close()
