"""gpu_jobs.train: resumable checkpoints (``training.checkpoint_every_steps``).

A job killed with SIGKILL after its first checkpoint, re-launched with the same arguments, killed again in
its second epoch and re-launched once more resumes each time from the latest complete checkpoint and ends
where an uninterrupted run ends: measured on CPU (tiny MiniLM, 32 training rows, max_length 48, batch 4,
2 epochs = 16 steps, a checkpoint every 2 steps), the final training loss, every step's loss and the
validation predictions are bit-identical (difference 0.0, with bf16 off as here and also with bf16
autocast on); the asserted tolerance is 1e-6. OUT never shows up before the job is done; a checkpoint folder
without its completion marker (or with a truncated file) is ignored.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gpu_jobs import checkpoint as C

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "data" / "shipped" / "arena_bench_pairs.parquet"
CONFIG = ROOT / "gpu_jobs" / "configs" / "cross_encoder_minilm.yaml"
SETTINGS = ["training.max_length=48", "inference.max_length=48", "training.batch_size=4", "training.epochs=2",
            "training.warmup_steps=2", "precision=fp32", "tta=false"]
TOL = 1e-6


def _job(data: Path, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "gpu_jobs.train", "--config", str(CONFIG), "--fold", "0", "--data", str(data),
            "--output-dir", str(out), "--set", *SETTINGS, *extra]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def _steps(ckpt: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in ckpt.glob("step-*"))


def _start_and_kill(cmd: list[str], ckpt: Path, min_step: int, log: Path) -> str:
    """Start the job, SIGKILL it once a complete checkpoint of step >= min_step is in place; its log."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=fh, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not [n for n in _steps(ckpt) if n >= min_step]:
                assert proc.poll() is None, f"the job ended before a checkpoint of step >= {min_step}"
                assert time.monotonic() < deadline, "no checkpoint within 300 s"
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == -signal.SIGKILL
    return log.read_text()


@pytest.mark.slow
def test_killed_job_resumes_from_its_latest_complete_checkpoint(tmp_path):
    frame = pd.read_parquet(PAIRS).sample(40, random_state=3).reset_index(drop=True)
    data = tmp_path / "train.parquet"
    frame.assign(fold=np.arange(40) % 5).to_parquet(data)  # 32 training rows: 8 steps of 4 per epoch
    ref, out = tmp_path / "ref", tmp_path / "out"
    ckpt = C.checkpoint_dir(out)

    _run(_job(data, ref, []))  # uninterrupted, no checkpoints

    # the same job with checkpoints, killed once its first checkpoint is complete; re-launched, and killed
    # again once a checkpoint of the second epoch is complete (a resumed later epoch must keep its own order)
    job = _job(data, out, ["training.checkpoint_every_steps=2"])
    _start_and_kill(job, ckpt, min_step=1, log=tmp_path / "first.log")
    assert not out.exists(), "OUT is only ever visible complete"
    assert (out.parent / "out.partial").exists()
    log = _start_and_kill(job, ckpt, min_step=10, log=tmp_path / "second.log")
    assert not out.exists()
    first_resume = int(log.split("resumed_from_step ")[1].split(":")[0])
    assert 0 < first_resume < 10, log[-2000:]

    # an incomplete checkpoint with a later step (no completion marker) must be ignored, not loaded
    complete = sorted(int(p.name.split("-")[1]) for p in ckpt.glob("step-*") if (p / C.CKPT_MARKER).exists())
    assert complete, list(ckpt.iterdir())
    fake_step = complete[-1] + 2  # the resumed job writes this step again: the leftover is replaced
    fake = ckpt / f"step-{fake_step}"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"garbage")

    proc = _run(_job(data, out, ["training.checkpoint_every_steps=2"]))
    metrics = json.loads((out / "metrics.json").read_text())
    resumed = metrics["resumed_from_step"]
    assert resumed >= 10 and resumed == complete[-1], (resumed, complete)
    assert f"resumed_from_step {resumed}" in proc.stderr + proc.stdout
    assert not ckpt.exists(), "OUT.ckpt is removed once OUT is published"

    ref_metrics = json.loads((ref / "metrics.json").read_text())
    assert metrics["n_steps"] == ref_metrics["n_steps"] == 16
    assert abs(metrics["final_train_loss"] - ref_metrics["final_train_loss"]) <= TOL
    assert abs(metrics["val_log_loss"] - ref_metrics["val_log_loss"]) <= TOL
    hist, ref_hist = _history(out), _history(ref)
    assert [h["step"] for h in hist] == list(range(1, 17)), "one line per step across the interruption"
    np.testing.assert_allclose([h["loss"] for h in hist], [h["loss"] for h in ref_hist], atol=TOL, rtol=0)
    np.testing.assert_allclose([h["lr"] for h in hist], [h["lr"] for h in ref_hist], rtol=1e-12)
    oof, ref_oof = pd.read_parquet(out / "oof.parquet"), pd.read_parquet(ref / "oof.parquet")
    assert oof["id"].tolist() == ref_oof["id"].tolist()
    np.testing.assert_allclose(oof[["p_a", "p_b", "p_tie"]].to_numpy(), ref_oof[["p_a", "p_b", "p_tie"]].to_numpy(),
                               atol=TOL, rtol=0)


def _fake_checkpoint(ckpt: Path, step: int, fingerprint: str, marker: bool = True) -> Path:
    path = ckpt / f"step-{step}"
    path.mkdir(parents=True)
    (path / "optimizer.bin").write_bytes(b"x" * 10)
    if marker:
        meta = {"complete": True, "step": step, "epoch": 0, "batch_in_epoch": step, "train_s": 1.0,
                "fingerprint": fingerprint, "files": {"optimizer.bin": 10}}
        (path / C.CKPT_MARKER).write_text(json.dumps(meta))
    return path


def test_incomplete_or_foreign_checkpoints_are_ignored(tmp_path):
    ckpt = tmp_path / "out.ckpt"
    assert C.find_checkpoint(ckpt, "job") is None  # no folder at all
    good = _fake_checkpoint(ckpt, 2, "job")
    _fake_checkpoint(ckpt, 4, "job", marker=False)  # killed before its marker
    truncated = _fake_checkpoint(ckpt, 6, "job")
    (truncated / "optimizer.bin").write_bytes(b"x" * 3)  # a file shorter than the marker says
    broken = _fake_checkpoint(ckpt, 8, "job")
    (broken / C.CKPT_MARKER).write_text('{"complete": tr')  # unreadable marker
    _fake_checkpoint(ckpt, 10, "another job")  # other config / data / fold
    tmp = _fake_checkpoint(ckpt, 12, "job")
    tmp.rename(ckpt / ".tmp-step-12")  # written but never renamed into place
    path, meta = C.find_checkpoint(ckpt, "job")
    assert path == good and meta["step"] == 2
    _fake_checkpoint(ckpt, 14, "job")
    assert C.find_checkpoint(ckpt, "job")[0] == ckpt / "step-14"


def test_fingerprint_follows_config_data_and_fold_but_not_the_interval(tmp_path):
    from gpu_jobs.config import load_config

    data = tmp_path / "d.parquet"
    data.write_bytes(b"rows")
    base = C.job_fingerprint(load_config(CONFIG), data, 0, 1)
    assert C.job_fingerprint(load_config(CONFIG, ["training.checkpoint_every_steps=5"]), data, 0, 1) == base
    assert C.job_fingerprint(load_config(CONFIG, ["training.lr=1e-5"]), data, 0, 1) != base
    assert C.job_fingerprint(load_config(CONFIG), data, 1, 1) != base
    assert C.job_fingerprint(load_config(CONFIG), data, 0, 2) != base
    data.write_bytes(b"other rows")
    assert C.job_fingerprint(load_config(CONFIG), data, 0, 1) != base


def test_features_family_accepts_and_ignores_the_setting():
    from gpu_jobs.config import load_config

    pytest.importorskip("gpu_jobs.models.features")
    cfg = load_config(ROOT / "gpu_jobs" / "configs" / "features.yaml", ["training.checkpoint_every_steps=10"])
    assert cfg.family == "features"
    with pytest.raises(ValueError, match="training.checkpoint_every_steps"):
        load_config(ROOT / "gpu_jobs" / "configs" / "features.yaml", ["training.checkpoint_every_steps=often"])
