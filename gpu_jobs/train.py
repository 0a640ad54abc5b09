"""Train one model on one fold, predict the held-out fold and extra files (contract 2).

    accelerate launch -m gpu_jobs.train --config gpu_jobs/configs/cross_encoder_minilm.yaml --fold 0 \
        --data train.parquet --output-dir OUT [--predict NAME=PATH ...] [--set training.lr=2e-4 ...]

Everything is written to ``OUT.partial/`` and renamed to ``OUT/`` only when the job succeeds:
``model/`` (weights or adapter + head + tokenizer + resolved config.yaml), ``oof.parquet``
(+ ``oof_tta.parquet``), ``pred_<NAME>.parquet`` (+ ``_tta``), ``metrics.json``, ``history.jsonl``.

With ``training.checkpoint_every_steps: N`` the neural loop saves a resumable checkpoint every N optimiser
steps into ``OUT.ckpt/`` (``gpu_jobs.checkpoint``); a job re-launched with the same arguments resumes from the
latest complete checkpoint, and ``OUT.ckpt`` is removed once ``OUT`` is published. ``--stop-file`` ends training
early (HPO pruning).

The neural families share one loop: an ``accelerate.Accelerator`` does device placement, autocast in the
precision the hardware runs natively (``precision: auto``, resolved by ``gpu_jobs.precision``), gradient accumulation and process groups; the rest is plain PyTorch. A
non-neural family (``features``) is fitted and applied by the main process, no loop. Each family's fit,
save and predict come from the registry (``gpu_jobs.models.registry``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from gpu_jobs import inputs as D
from gpu_jobs.checkpoint import Checkpointer, checkpoint_dir, fresh_start, job_fingerprint, restore_rng, stop_requested
from gpu_jobs.config import load_config, save_config
from gpu_jobs.contract.atomic import atomic_write_parquet, publish_dir
from gpu_jobs.contract.metrics import accuracy, log_loss, per_class_loss
from gpu_jobs.contract.pipes import clean_metadata, open_pipes
from gpu_jobs.precision import Precision, hardware_summary, resolve
from gpu_jobs.inputs import prediction_frame
from gpu_jobs.models.registry import family_of

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


# ------------------------------------------------------------------------------------------ arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_jobs.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="gpu_jobs/configs/<model>.yaml")
    p.add_argument("--fold", type=int, required=True, help="rows with fold == K are validation")
    p.add_argument("--data", required=True, help="training parquet (contract 2)")
    p.add_argument("--output-dir", required=True, help="OUT; written as OUT.partial, renamed at the end")
    p.add_argument("--predict", action="extend", nargs="+", default=[], metavar="NAME=PATH",
                   help="also predict this parquet into pred_NAME.parquet (repeatable)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="config overrides, e.g. --set training.lr=2e-4 tta=false (YAML values; repeatable)")
    p.add_argument("--stop-file", type=Path, default=None, metavar="PATH",
                   help="stop training after the step in which PATH appears, then predict and publish as usual "
                        "(neural families; HPO pruning writes it)")
    return p.parse_args(argv)


def parse_predict_specs(specs: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not NAME_RE.match(name):
            raise ValueError(f"--predict {spec!r}: expected NAME=PATH with NAME made of letters, digits, _ . -")
        if name in out:
            raise ValueError(f"--predict {spec!r}: name {name!r} given twice")
        if not Path(path).exists():
            raise FileNotFoundError(f"--predict {spec!r}: file {path} not found")
        out[name] = Path(path)
    return out


# ------------------------------------------------------------------------------------------ pieces
def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                       tie_free: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy with probability targets (one-hot human labels or soft pseudo labels), weighted mean over
    rows (``F.cross_entropy`` weights classes, not rows: the per-row losses are weighted here). Rows where
    ``tie_free`` is True could not be labelled a tie (``gpu_jobs/contract/ties.py``): their tie logit is masked,
    so they cost -log P(y | not tie) and teach A vs B only."""
    logits = logits.float()
    if tie_free is not None:
        tie_column = tie_free[:, None] & (torch.arange(3, device=logits.device) == 2)
        logits = logits.masked_fill(tie_column, -1e4)
        targets = targets.masked_fill(tie_column, 0.0)  # soft targets (a teacher's) keep their A : B only
        targets = targets / targets.sum(dim=1, keepdim=True).clamp_min(1e-12)
    per_row = F.cross_entropy(logits, targets, reduction="none")
    return (per_row * weight).sum() / weight.sum().clamp_min(1e-12)


def make_optimizer(model, cfg, head_names: tuple[str, ...]) -> torch.optim.Optimizer:
    """AdamW with four groups: body/head (head_lr) x decay/no-decay (biases and norms are not decayed)."""
    t = cfg.training
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = any(part in head_names for part in name.split("."))
        decay = p.ndim >= 2 and "norm" not in name.lower()
        groups.setdefault((head, decay), []).append(p)
    param_groups = [{"params": ps, "lr": (t.head_lr or t.lr) if head else t.lr,
                     "weight_decay": t.weight_decay if decay else 0.0}
                    for (head, decay), ps in sorted(groups.items())]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=t.lr)
    import bitsandbytes as bnb  # 8-bit optimisers (the recipe's paged AdamW 8-bit)

    cls = bnb.optim.PagedAdamW8bit if t.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    if cls is bnb.optim.PagedAdamW8bit and not torch.cuda.is_available():  # paging is CUDA unified memory
        cls = bnb.optim.AdamW8bit
        print("gpu_jobs.train: optimizer paged_adamw_8bit: bitsandbytes pages optimizer state only on CUDA; "
              "without CUDA using the fallback bitsandbytes AdamW8bit (same 8-bit state, not paged)",
              file=sys.stderr, flush=True)
    return cls(param_groups, lr=t.lr)


def log_losses(probs: np.ndarray, y: np.ndarray) -> dict[str, float | None]:
    """Multiclass log loss, accuracy and the loss on the rows of each true class (None where none)."""
    p = probs / probs.sum(axis=1, keepdims=True)  # float32 softmax outputs sum to 1 only within ~1e-7
    out: dict[str, float | None] = {"log_loss": log_loss(y, p), "accuracy": accuracy(y, p)}
    for name, loss in per_class_loss(y, p).items():
        out[f"loss_{name}"] = None if math.isnan(loss) else loss
    return out


# ------------------------------------------------------------------------------------------ training
def fit_neural(cfg, train_df: pd.DataFrame, y: np.ndarray, w: np.ndarray, accelerator, history_path: Path | None,
               checkpointer: Checkpointer | None = None, log=None, report=None, held_out: pd.DataFrame | None = None,
               stop_file: Path | None = None):
    """The training loop. Returns (unwrapped model, tokenizer, stats).

    ``report`` (the main process's Pipes ``report_custom_message``) gets ``{"kind": "step", "step", "epoch",
    "loss", "lr", "examples_per_s"}`` after every optimiser step, so the orchestrator can chart the run live.
    With ``training.eval_every_steps`` N, the main process also scores ``held_out`` every N steps and reports
    ``{"kind": "val", "step", "val_log_loss"}`` (``stats["val_curve"]``). Once ``stop_file`` exists (HPO
    pruning: the orchestrator writes it), every process stops after the current step (accelerate's trigger,
    so all ranks stop at the same one); the job then predicts and publishes as usual
    (``stats["stopped_early_at_step"]``).

    With a ``checkpointer`` the loop first resumes from the job's latest complete checkpoint, if any
    (batches already done in that epoch are skipped: the order is seeded), and saves one every
    ``checkpointer.every`` optimiser steps.

    The family's rows become batches through its ``RowIO`` (``family.io(cfg)``). A family with a pre-training
    stage (``family.pretrain``; the reward model's ``pretrain:`` section) runs it first, on data that must not
    touch ``held_out`` (the validation rows); its metrics join ``stats``."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    t = cfg.training
    family = family_of(cfg)
    model, tokenizer = family.build(cfg, device=accelerator.device)
    pre_stats = family.pretrain(cfg, model, tokenizer, accelerator, held_out, log=log)

    io = family.io(cfg)
    ids = io.encode(train_df, tokenizer, t.max_length, cfg.text.truncation_side,
                    max_chars_per_part=cfg.text.max_chars_per_part)
    sampler_cls = D.LengthGroupedBatchSampler if t.group_by_length else D.RandomBatchSampler
    sampler = sampler_cls([io.row_length(x) for x in ids], t.batch_size, seed=cfg.seed)
    pad_multiple = 8 if accelerator.device.type == "cuda" else None
    tie_free = torch.as_tensor(~D.ties_possible(train_df, "the training rows"))
    tie_free = tie_free if bool(tie_free.any()) else None  # rows that teach A vs B only (contract.ties)
    loader = DataLoader(D.PairsDataset(ids, y, w), batch_sampler=sampler,
                        collate_fn=io.collator(tokenizer.pad_token_id, pad_multiple))

    # counted on the whole (unsharded) loader: accelerate steps a prepared scheduler once per process
    total_steps = math.ceil(len(loader) / t.grad_accum) * t.epochs
    optimizer = make_optimizer(model, cfg, family.head_names)
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total_steps)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:  # a batch sampler leaves loader.batch_size None, which DeepSpeed's "auto" needs
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = t.batch_size
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    # ---- resume
    r = checkpointer.resume(model, history_path, log, len(loader)) if checkpointer is not None else fresh_start()
    step, seen, step_losses, prior_train_s = r["step"], r["seen"], r["losses"], r["train_s"]
    start_epoch, skip_batches, resume_rng, resumed_from = r["epoch"], r["batch_in_epoch"], r["rng"], r["step"]

    history = open(history_path, "a" if resumed_from else "w") if history_path is not None else None
    progress = tqdm(total=math.ceil(len(loader) / t.grad_accum) * t.epochs, initial=step, desc=f"train {cfg.name}",
                    disable=not accelerator.is_local_main_process)
    micro_losses = []
    y_held_out = D.labels(held_out, "the validation fold") if t.eval_every_steps and held_out is not None else None
    val_curve: list[dict] = []
    stopped_at = None
    model.train()
    t0 = time.perf_counter()
    for epoch in range(start_epoch, t.epochs):
        # accelerate's prepared loader re-sets the sampler's epoch from its own counter at every pass, which
        # starts at 0 in a resumed process: set both, or a resumed later epoch replays epoch 0's order
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        skip = skip_batches if epoch == start_epoch else 0
        for batch_idx, batch in enumerate(loader):
            if resume_rng is not None:  # the epoch's iterator has drawn its seed: now the saved RNG state
                restore_rng(resume_rng)
                resume_rng = None
            if batch_idx < skip:  # done before the checkpoint
                continue
            with accelerator.accumulate(model):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = soft_cross_entropy(logits, batch["targets"], batch["weight"],
                                          None if tie_free is None else tie_free[batch["index"].cpu()].to(logits.device))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(loss.detach().float())
            seen += batch["input_ids"].shape[0]
            if accelerator.sync_gradients:  # one optimiser step done
                step += 1
                step_loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
                micro_losses = []
                step_losses.append(step_loss)
                lr = scheduler.get_last_lr()[0]
                if history is not None:
                    history.write(json.dumps({"step": step, "epoch": epoch, "loss": step_loss, "lr": lr,
                                              "elapsed_s": round(prior_train_s + time.perf_counter() - t0, 4)}) + "\n")
                    history.flush()
                if report is not None and accelerator.is_main_process:
                    report({"kind": "step", "step": step, "epoch": epoch, "loss": step_loss, "lr": lr,
                            "examples_per_s": seen / max(time.perf_counter() - t0, 1e-9)})
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                if checkpointer is not None and step % checkpointer.every == 0:
                    checkpointer.save(step, epoch, batch_idx + 1, seen,
                                      prior_train_s + time.perf_counter() - t0, history_path)
                if y_held_out is not None and step % t.eval_every_steps == 0:
                    val_curve.append(_score_held_out(cfg, family, accelerator, model, tokenizer, held_out,
                                                     y_held_out, step))
                    if report is not None and accelerator.is_main_process:
                        report({"kind": "val", **val_curve[-1]})
                if stop_requested(accelerator, stop_file):
                    stopped_at = step
                    break
        if stopped_at is not None:
            if log is not None:
                log.info(f"{cfg.name}: stopped at step {step} ({stop_file} appeared)")
            break
    train_s = time.perf_counter() - t0
    progress.close()
    if history is not None:
        history.close()
    if checkpointer is not None:
        checkpointer.close()
    seen_all = int(accelerator.reduce(torch.tensor(seen, device=accelerator.device), reduction="sum").item())
    stats = {
        "train_examples_per_s": seen_all / max(prior_train_s + train_s, 1e-9),
        "train_s": prior_train_s + train_s,
        "n_steps": step,
        "resumed_from_step": resumed_from,
        "first_train_loss": step_losses[0] if step_losses else None,
        # mean of the last 10 % of steps (at least 1): one step is too noisy to compare runs by
        "final_train_loss": float(np.mean(step_losses[-max(1, len(step_losses) // 10):])) if step_losses else None,
        **pre_stats,
        **({"val_curve": val_curve} if val_curve else {}),
        **({"stopped_early_at_step": stopped_at} if stopped_at is not None else {}),
    }
    model = accelerator.unwrap_model(model)
    model.eval()
    return model, tokenizer, stats


def _score_held_out(cfg, family, accelerator, model, tokenizer, held_out: pd.DataFrame, y: np.ndarray,
                    step: int) -> dict:
    """The validation fold's log loss at this step, scored by the main process (the others wait), no TTA."""
    value = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        plain = accelerator.unwrap_model(model)
        plain.eval()
        with torch.no_grad():
            probs, _ = family.predict(cfg, plain, tokenizer, held_out, tta=False, device=accelerator.device)
        plain.train()
        value = float(log_loss(y, probs))
    accelerator.wait_for_everyone()
    return {"step": step, "val_log_loss": value}


# ------------------------------------------------------------------------------------------ the job
def run(args: argparse.Namespace, cfg, accelerator, pipes, precision: Precision | None = None) -> dict:
    t_start = time.perf_counter()
    main_proc = accelerator.is_main_process
    out = Path(args.output_dir)
    partial = out.with_name(out.name + ".partial")
    predict_specs = parse_predict_specs(args.predict)
    if main_proc:
        shutil.rmtree(partial, ignore_errors=True)  # a stale one from a crashed run
        (partial / "model").mkdir(parents=True)
    accelerator.wait_for_everyone()

    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    frame = D.read_frame(args.data)
    train_df, val_df = D.split_fold(frame, args.fold, str(args.data))
    family = family_of(cfg)
    training = getattr(cfg, "training", None)  # a non-neural family's config may have no training section
    cap = getattr(training, "max_train_rows", None)
    if cap and len(train_df) > cap:
        train_df = train_df.sample(n=cap, random_state=cfg.seed).reset_index(drop=True)
    if getattr(training, "swap_augment", False):
        train_df = pd.concat([train_df, D.swap_frame(train_df)], ignore_index=True)
    y, w = D.targets(train_df, str(args.data)), D.sample_weights(train_df, str(args.data))
    y_val = D.labels(val_df, str(args.data))
    extra = {name: D.read_frame(path) for name, path in predict_specs.items()}  # fail early on a bad file
    pipes.log.info(f"{cfg.name} ({cfg.family}) fold {args.fold}: {len(train_df)} training rows, {len(val_df)} "
                   f"validation rows, {len(extra)} extra prediction file(s), {accelerator.num_processes} process(es)")
    resolved = {"hardware": hardware_summary()}
    if precision is not None:
        resolved.update(precision=precision.name, precision_reason=precision.reason)
        pipes.log.info(f"{cfg.name}: {precision.describe()}; {resolved['hardware']}")

    # a neural family trains on every process (the shared loop); any other is cheap: the main process fits it
    # and the other ranks wait
    model, tokenizer, stats = None, None, {}
    if family.neural or main_proc:
        every = getattr(training, "checkpoint_every_steps", None) if family.neural else None
        checkpointer = None
        if every:
            fingerprint = job_fingerprint(cfg, Path(args.data), args.fold, accelerator.num_processes)
            checkpointer = Checkpointer(accelerator, checkpoint_dir(out), every, fingerprint)
        model, tokenizer, stats = family.fit(cfg, train_df, y, w, accelerator,
                                             partial / "history.jsonl" if main_proc else None,
                                             checkpointer=checkpointer, log=pipes.log,
                                             report=pipes.report_custom_message, held_out=val_df,
                                             **({"stop_file": args.stop_file} if family.neural else {}))

    if main_proc:  # save the model before predicting: a crash in prediction should not lose it
        family.save(model, tokenizer, partial / "model")
        save_config(cfg, partial / "model" / "config.yaml", resolved=resolved)

    # ---- prediction: the validation fold and every --predict file, plus TTA twins
    do_predict = family.neural or main_proc
    t_pred, n_pred = time.perf_counter(), 0
    results: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    if do_predict:
        for name, df in [("oof", val_df), *extra.items()]:
            results[name] = family.predict(cfg, model, tokenizer, df, tta=cfg.tta, accelerator=accelerator,
                                           progress=True)
            n_pred += len(df) * (2 if cfg.tta else 1)
    predict_s = time.perf_counter() - t_pred

    metrics: dict = {}
    if main_proc:
        probs, probs_tta = results["oof"]
        atomic_write_parquet(prediction_frame(val_df["id"], probs, val_df["fold"]), partial / "oof.parquet")
        if probs_tta is not None:
            atomic_write_parquet(prediction_frame(val_df["id"], probs_tta, val_df["fold"]), partial / "oof_tta.parquet")
        for name, df in extra.items():
            p, p_tta = results[name]
            atomic_write_parquet(prediction_frame(df["id"], p), partial / f"pred_{name}.parquet")
            if p_tta is not None:
                atomic_write_parquet(prediction_frame(df["id"], p_tta), partial / f"pred_{name}_tta.parquet")
        val = log_losses(probs, y_val)
        metrics = {
            "val_log_loss": val["log_loss"], "val_accuracy": val["accuracy"],
            "val_loss_a": val["loss_a"], "val_loss_b": val["loss_b"], "val_loss_tie": val["loss_tie"],
            "train_examples_per_s": stats["train_examples_per_s"],
            "predict_examples_per_s": n_pred / max(predict_s, 1e-9),
            "wall_s": time.perf_counter() - t_start,
            "n_train": len(train_df), "n_val": len(val_df),
            "final_train_loss": stats["final_train_loss"], "first_train_loss": stats["first_train_loss"],
            "n_steps": stats["n_steps"], "resumed_from_step": stats["resumed_from_step"],
            "fold": args.fold, "family": cfg.family, "name": cfg.name,
            "num_processes": accelerator.num_processes,
            **({"precision": precision.name} if precision is not None else {}),
            **{k: v for k, v in stats.items() if k.startswith("pretrain_")},
            **{k: stats[k] for k in ("val_curve", "stopped_early_at_step") if k in stats},
            **stats.get("metrics", {}),  # a family's own figures (e.g. the dpo family's calibration)
        }
        if probs_tta is not None:
            metrics["val_log_loss_tta"] = log_losses(probs_tta, y_val)["log_loss"]
            metrics["val_log_loss_tta_mean"] = log_losses((probs + probs_tta) / 2, y_val)["log_loss"]
        with open(partial / "metrics.json", "w") as fh:
            json.dump(metrics, fh, indent=2)
        publish_dir(partial, out)  # an older OUT is moved aside first and removed after
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)  # OUT is complete: nothing left to resume
        pipes.log.info(f"{cfg.name} fold {args.fold}: val_log_loss {metrics['val_log_loss']:.4f}, "
                       f"accuracy {metrics['val_accuracy']:.3f} -> {out}")
        pipes.report_asset_materialization(metadata=clean_metadata({**metrics, "output_dir": str(out)}))
    accelerator.wait_for_everyone()
    return metrics


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)  # every config error surfaces here, before any model loads
    from accelerate import Accelerator

    neural = family_of(cfg).neural
    precision = resolve(cfg.precision) if neural else None
    if precision is not None and precision.warning:
        print(f"gpu_jobs.train: {precision.warning}", file=sys.stderr, flush=True)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision.mixed_precision if neural else "no",
        gradient_accumulation_steps=cfg.training.grad_accum if neural else 1,
    )
    with open_pipes() as pipes:
        try:
            run(args, cfg, accelerator, pipes, precision)
        except Exception as exc:
            pipes.log.error(f"gpu_jobs.train failed: {type(exc).__name__}: {exc}")
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
