"""gpu_jobs.predict: input order, A/B swap symmetry of TTA, the CLI of contract 3."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gpu_jobs import inputs as D
from gpu_jobs.config import load_config, save_config
from gpu_jobs.predict import predict_frame

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "data" / "shipped" / "arena_bench_pairs.parquet"
CONFIGS = ROOT / "gpu_jobs" / "configs"


def make_model_dir(path: Path, precision: str = "fp32") -> Path:
    """A MiniLM cross-encoder model directory without training: a random, larger-scale head, so that its
    predictions are far from uniform and differ between A/B orders."""
    from gpu_jobs.models import cross_encoder

    cfg = load_config(CONFIGS / "cross_encoder_minilm.yaml",
                      [f"precision={precision}", "inference.max_length=64", "inference.batch_size=4"])
    model, tokenizer = cross_encoder.build(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.5)
    path.mkdir(parents=True, exist_ok=True)
    cross_encoder.save(model, tokenizer, path)
    save_config(cfg, path / "config.yaml")
    return path


def rows(n: int = 24, seed: int = 3) -> pd.DataFrame:
    return pd.read_parquet(PAIRS).sample(n, random_state=seed).reset_index(drop=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("predict") / "model")


def test_results_come_back_in_input_order(model_dir):
    frame = rows()
    probs, none = predict_frame(model_dir, frame)
    assert none is None and probs.shape == (24, 3) and np.allclose(probs.sum(1), 1)
    assert probs.std(axis=0).max() > 0.01  # not a constant
    perm = np.random.default_rng(0).permutation(24)
    shuffled, _ = predict_frame(model_dir, frame.iloc[perm].reset_index(drop=True), batch_size=5)
    np.testing.assert_allclose(shuffled, probs[perm], atol=1e-5)


def test_tta_swaps_texts_and_permutes_back(model_dir):
    frame = rows()
    probs, probs_tta = predict_frame(model_dir, frame, tta=True)
    swapped, swapped_tta = predict_frame(model_dir, D.swap_frame(frame), tta=True)
    # the TTA member is the swapped-text prediction with A and B exchanged back
    np.testing.assert_allclose(probs_tta, swapped[:, [1, 0, 2]], atol=1e-5)
    assert np.abs(probs_tta - probs).max() > 1e-3  # the model itself is not symmetric...
    mean, mean_swapped = (probs + probs_tta) / 2, (swapped + swapped_tta) / 2
    np.testing.assert_allclose(mean_swapped, mean[:, [1, 0, 2]], atol=1e-5)  # ...its TTA average is


def test_bf16_autocast_predictions_are_close_to_fp32(tmp_path, model_dir):
    frame = rows(12)
    fp32, _ = predict_frame(model_dir, frame)
    bf16, _ = predict_frame(make_model_dir(tmp_path / "bf16", precision="bf16"), frame)
    assert np.abs(bf16 - fp32).max() < 0.05


def test_predict_cli_writes_ids_and_tta_file(model_dir, tmp_path):
    frame = rows(10)
    data, out = tmp_path / "rows.parquet", tmp_path / "preds.parquet"
    frame.drop(columns=D.WINNER_COLUMNS).to_parquet(data)
    proc = subprocess.run([sys.executable, "-m", "gpu_jobs.predict", "--model-dir", str(model_dir), "--data",
                           str(data), "--output", str(out), "--tta"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds, preds_tta = pd.read_parquet(out), pd.read_parquet(tmp_path / "preds_tta.parquet")
    assert list(preds.columns) == ["id", "p_a", "p_b", "p_tie"] and preds.id.tolist() == frame.id.tolist()
    expected, expected_tta = predict_frame(model_dir, frame, tta=True)
    np.testing.assert_allclose(preds[["p_a", "p_b", "p_tie"]].to_numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(preds_tta[["p_a", "p_b", "p_tie"]].to_numpy(), expected_tta, atol=1e-5)


def test_missing_model_dir_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="gpu_jobs.train output"):
        predict_frame(tmp_path, rows(2))
