"""Resumable training: checkpoints of the neural loops and the stop file.

With ``training.checkpoint_every_steps: N`` a loop saves a checkpoint every N optimiser steps into
``OUT.ckpt/step-<n>/`` (trainable weights, optimizer, scheduler, RNG states, step, epoch and position in the
epoch's seeded batch order; written as ``OUT.ckpt/.tmp-step-<n>/`` and renamed, with a completion marker
listing every file; the last 2 are kept); a job re-launched with the same arguments (``job_fingerprint``)
resumes from the latest complete one. ``stop_requested``: every process stops after the same step once the
stop file exists (HPO pruning). Used by ``gpu_jobs.train.fit_neural`` and the ``dpo`` family's loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from gpu_jobs.config import config_to_dict
from gpu_jobs.contract.atomic import fsync_dir, publish_dir

CKPT_MARKER = "checkpoint.json"  # written last, listing every file with its size: no marker, no checkpoint
CKPT_KEEP = 2
CKPT_RE = re.compile(r"^step-(\d+)$")


def checkpoint_dir(out: Path) -> Path:
    return out.with_name(out.name + ".ckpt")


def job_fingerprint(cfg, data_path: Path, fold: int, num_processes: int) -> str:
    """What a checkpoint must match to be resumed: resolved config (bar the checkpoint interval), fold,
    the data file's bytes and the process count (it shards the batches)."""
    config = config_to_dict(cfg)
    config.get("training", {}).pop("checkpoint_every_steps", None)
    h = hashlib.sha256(json.dumps({"config": config, "fold": fold, "num_processes": num_processes},
                                  sort_keys=True, default=str).encode())
    with open(data_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_checkpoint(path: Path, fingerprint: str) -> dict | None:
    """The marker of a complete checkpoint folder of this job, else None (missing or unreadable marker,
    another job's fingerprint, a missing or truncated file)."""
    m = CKPT_RE.match(path.name)
    if m is None or not path.is_dir():
        return None
    try:
        meta = json.loads((path / CKPT_MARKER).read_text())
        if not (meta.get("complete") is True and meta.get("step") == int(m.group(1))
                and meta.get("fingerprint") == fingerprint):
            return None
        for name, size in meta["files"].items():
            if (path / name).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return meta


def find_checkpoint(ckpt_dir: Path, fingerprint: str) -> tuple[Path, dict] | None:
    """The latest complete checkpoint of this job in ``ckpt_dir``; incomplete or foreign folders are skipped."""
    if not ckpt_dir.is_dir():
        return None
    found = [(meta["step"], path, meta) for path in ckpt_dir.iterdir()
             if (meta := read_checkpoint(path, fingerprint)) is not None]
    if not found:
        return None
    _, path, meta = max(found, key=lambda x: x[0])
    return path, meta


def fresh_start() -> dict:
    """What ``Checkpointer.resume`` returns when there is nothing to resume (a new dict: ``losses`` grows)."""
    return {"step": 0, "epoch": 0, "batch_in_epoch": 0, "seen": 0, "train_s": 0.0, "rng": None, "losses": []}


class Checkpointer:
    """Saves and finds the resumable checkpoints of one job (every process calls every method)."""

    def __init__(self, accelerator, ckpt_dir: Path, every: int, fingerprint: str, keep: int = CKPT_KEEP):
        self.acc, self.dir, self.every, self.fingerprint, self.keep = accelerator, ckpt_dir, every, fingerprint, keep
        self._trainable: set[str] = set()
        self._hook = None

    # -- saving only the trainable tensors (the adapter and head of a LoRA model, everything when fully tuned)
    def attach(self, model) -> None:
        self._trainable = {name for name, p in model.named_parameters() if p.requires_grad}

        def keep_trainable(models, weights, output_dir):
            for i, w in enumerate(weights):
                weights[i] = {k: v for k, v in w.items() if k in self._trainable}

        self._hook = self.acc.register_save_state_pre_hook(keep_trainable)

    def latest(self) -> tuple[Path, dict] | None:
        """The checkpoint to resume from, decided by the main process and shared with the others."""
        found = find_checkpoint(self.dir, self.fingerprint) if self.acc.is_main_process else None
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            found = broadcast_object_list([found])[0]
        if found is None and self.acc.is_main_process and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)  # nothing here this job can use
        self.acc.wait_for_everyone()
        return found

    def load(self, path: Path) -> dict:
        """Weights, optimizer, scheduler and accelerate's counters from ``path``; returns this rank's state
        (RNG to re-apply once the epoch's data iterator exists, examples seen)."""
        self.acc.load_state(str(path), strict=False)  # only the trainable tensors are in the checkpoint
        weights = path / "model.safetensors"
        if weights.exists():
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as fh:
                missing = self._trainable - set(fh.keys())
            if missing:
                raise RuntimeError(f"{path}: checkpoint lacks {len(missing)} trainable tensor(s), "
                                   f"e.g. {sorted(missing)[:3]}; remove {self.dir} to start over")
        return torch.load(path / f"rank_state_{self.acc.process_index}.pt", weights_only=False)

    def save(self, step: int, epoch: int, batch_in_epoch: int, seen: int, train_s: float,
             history_path: Path | None) -> Path:
        acc, main = self.acc, self.acc.is_main_process
        tmp, final = self.dir / f".tmp-step-{step}", self.dir / f"step-{step}"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        torch.save({"rng": capture_rng(), "seen": seen}, tmp / f"rank_state_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if main:
            if history_path is not None:
                shutil.copyfile(history_path, tmp / "history.jsonl")
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            meta = {"complete": True, "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                    "train_s": train_s, "num_processes": acc.num_processes, "fingerprint": self.fingerprint,
                    "files": files}
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb+") as fh:
                        os.fsync(fh.fileno())
            with open(tmp / CKPT_MARKER, "w") as fh:
                json.dump(meta, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(tmp)
            # an existing folder with this step's name is an incomplete leftover (a complete one was resumed past)
            publish_dir(tmp, final, fsync=True)
            self._rotate()
        acc.wait_for_everyone()
        return final

    def _rotate(self) -> None:
        """Keep the last ``keep`` complete checkpoints; drop older ones, temporaries and incomplete folders."""
        complete = sorted((meta["step"], path) for path in self.dir.iterdir()
                          if (meta := read_checkpoint(path, self.fingerprint)) is not None)
        keep = {path for _, path in complete[-self.keep:]}
        for path in self.dir.iterdir():
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def resume(self, model, history_path: Path | None, log=None, n_batches: int | None = None) -> dict:
        """Attach to the prepared ``model`` and load the job's latest complete checkpoint, if any. Returns
        ``fresh_start()`` without one, else its ``step``, ``epoch``, ``batch_in_epoch`` (batches of that epoch
        done), ``seen``, ``train_s``, ``rng`` (this rank's RNG state, to re-apply where the loop's data order
        has drawn its seed) and ``losses`` (per step); ``history_path`` is cut to the steps up to it (the
        later ones are redone)."""
        self.attach(model)
        found = self.latest()
        if found is None:
            return fresh_start()
        path, meta = found
        rank_state = self.load(path)
        lines = (path / "history.jsonl").read_text().splitlines()
        past = [json.loads(line) for line in lines if line.strip()][:meta["step"]]
        if history_path is not None:
            history_path.write_text("".join(json.dumps(h) + "\n" for h in past))
        if log is not None:
            log.info(f"resumed_from_step {meta['step']}: {path} (epoch {meta['epoch']}, batch "
                     f"{meta['batch_in_epoch']} of {n_batches if n_batches is not None else '?'})")
        return {"step": meta["step"], "epoch": meta["epoch"], "batch_in_epoch": meta["batch_in_epoch"],
                "seen": rank_state["seen"], "train_s": meta["train_s"], "rng": rank_state["rng"],
                "losses": [h["loss"] for h in past]}

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def stop_requested(accelerator, stop_file: Path | None) -> bool:
    """True on every process once ``stop_file`` exists (HPO pruning): the main process looks, accelerate's trigger
    makes all ranks stop after the same step."""
    if stop_file is None:
        return False
    if accelerator.is_main_process and Path(stop_file).exists():
        accelerator.set_trigger()
    return accelerator.check_trigger()
