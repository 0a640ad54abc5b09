"""Two CPU processes (`accelerate launch --multi_gpu --num_processes 2`, gloo): every row predicted and
written exactly once, and Dagster Pipes opened by the main process only (DESIGN §9)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from arena_pipeline_tests.gpu_jobs.contract.test_pipes import pipes_env, read_messages
from arena_pipeline_tests.gpu_jobs.test_predict import make_model_dir
from gpu_jobs.predict import predict_frame

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "data" / "shipped" / "arena_bench_pairs.parquet"
TWO_PROCS = ROOT / "gpu_jobs" / "accelerate_configs" / "cpu_2proc.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    if not extra_env:
        env.pop("DAGSTER_PIPES_CONTEXT", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(TWO_PROCS),
           "--main_process_port", str(free_port()), "-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_process_predict_writes_every_row_once(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    frame = pd.read_parquet(PAIRS).sample(37, random_state=5).reset_index(drop=True)  # odd: uneven shards
    data, out = tmp_path / "rows.parquet", tmp_path / "preds.parquet"
    frame.to_parquet(data)
    proc = launch("gpu_jobs.predict", ["--model-dir", str(model_dir), "--data", str(data), "--output", str(out),
                                       "--tta", "--batch-size", "4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 0/2 predicted" in proc.stderr and "process 1/2 predicted" in proc.stderr
    preds = pd.read_parquet(out)
    assert preds.id.tolist() == frame.id.tolist()  # every row, once, in input order
    single, single_tta = predict_frame(model_dir, frame, tta=True, batch_size=4)
    np.testing.assert_allclose(preds[["p_a", "p_b", "p_tie"]].to_numpy(), single, atol=1e-5)
    tta = pd.read_parquet(tmp_path / "preds_tta.parquet")
    np.testing.assert_allclose(tta[["p_a", "p_b", "p_tie"]].to_numpy(), single_tta, atol=1e-5)


@pytest.mark.slow
def test_two_process_training_under_dagster_pipes_reports_once(tmp_path):
    frame = pd.read_parquet(PAIRS).sample(40, random_state=6).reset_index(drop=True)
    frame["fold"] = np.arange(40) % 4
    data, out = tmp_path / "train.parquet", tmp_path / "out"
    frame.to_parquet(data)
    env, messages = pipes_env(tmp_path)
    proc = launch("gpu_jobs.train", [
        "--config", str(ROOT / "gpu_jobs" / "configs" / "cross_encoder_minilm.yaml"), "--fold", "1",
        "--data", str(data), "--output-dir", str(out), "--set", "training.max_length=48", "inference.max_length=48",
        "training.batch_size=4", "training.epochs=1", "tta=false"], extra_env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    methods = [m["method"] for m in read_messages(messages)]
    assert methods.count("opened") == 1 and methods.count("closed") == 1
    assert methods.count("report_asset_materialization") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["n_val"] == 10 and metrics["n_train"] == 30
    oof = pd.read_parquet(out / "oof.parquet")
    assert sorted(oof.id) == sorted(frame.id[frame.fold == 1]) and oof.id.is_unique
    history = (out / "history.jsonl").read_text().splitlines()
    assert len(history) == 4  # 30 rows / batch 4 = 8 batches, 4 per process
