"""How the data layer scales: read_table + clean_frame + build_processed on synthetic Kaggle rows.

Generates rows in the Kaggle ``train.csv`` layout (id, model_a, model_b, prompt, response_a,
response_b, winner_model_a, winner_model_b, winner_tie; text cells are JSON lists of a few hundred
to a few thousand characters, ~1000 distinct prompts per 10k rows, ~15% multi-turn, some unicode,
quotes and newlines, 0.5% exact duplicates of which a third disagree on the label), writes them as
CSV, and times each stage. Prints seconds per stage, rows/s, and whether time grows about linearly.

    .venv/bin/python benchmarks/data_scaling.py                    # 10k, 50k, 200k rows
    .venv/bin/python benchmarks/data_scaling.py --rows 10000 50000 --profile   # + cProfile of the largest

Target (issue "Reliability"): 200k rows under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import gc
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arena_pipeline.data.clean import clean_frame  # noqa: E402
from arena_pipeline.data.folds import build_processed  # noqa: E402
from arena_pipeline.data.load import read_table  # noqa: E402

COLUMNS = ["id", "model_a", "model_b", "prompt", "response_a", "response_b",
           "winner_model_a", "winner_model_b", "winner_tie"]
MODELS = ["gpt-4-0613", "gpt-4-1106-preview", "claude-2.1", "claude-instant-1", "llama-2-70b-chat",
          "mixtral-8x7b-instruct-v0.1", "gemini-pro", "vicuna-33b", "mistral-medium", "yi-34b-chat"]
WORDS = ("the of and to in is that for it as with was on be by this are or an not at from which but have "
         "model answer question python function data example result value table list error because "
         "however first second finally should could would return print import class def loop string "
         "number file user code output input step case point note also more most very each such").split()
EXTRA = ["é", "ü", "ß", "中文", "日本語", "😀", "—", "“quoted”", '"double"', "it's", "\n", "\n\n", "\t", "\\", "{}", "[1, 2]"]


def _text_pool(rng: np.random.Generator, n: int, mean_chars: int) -> list[str]:
    """``n`` texts with lognormal lengths around ``mean_chars`` (a few hundred to a few thousand)."""
    words = np.array(WORDS + EXTRA, dtype=object)
    p = np.r_[np.full(len(WORDS), 0.97 / len(WORDS)), np.full(len(EXTRA), 0.03 / len(EXTRA))]
    lengths = np.clip(rng.lognormal(np.log(mean_chars), 0.7, size=n), 20, 20 * mean_chars).astype(int)
    out = []
    for length in lengths:
        k = max(3, int(length) // 6)
        out.append(" ".join(rng.choice(words, size=k, p=p)))
    return out


def make_rows(n: int, seed: int = 0) -> list[list]:
    rng = np.random.default_rng(seed)
    n_prompts = max(n // 10, 4)
    prompts = _text_pool(rng, n_prompts, 250)
    responses = _text_pool(rng, 4000, 1100)
    rows = []
    for i in range(n):
        turns = int(rng.choice([1, 2, 3], p=[0.85, 0.1, 0.05]))
        p = [prompts[int(rng.integers(n_prompts))] for _ in range(turns)]
        a = [responses[int(rng.integers(4000))] + f" [a{i}.{t}]" for t in range(turns)]
        b = [responses[int(rng.integers(4000))] + f" [b{i}.{t}]" for t in range(turns)]
        label = int(rng.choice(3, p=[0.35, 0.34, 0.31]))
        ma, mb = rng.choice(len(MODELS), size=2, replace=False)
        rows.append([str(10_000_000 + i), MODELS[ma], MODELS[mb], json.dumps(p), json.dumps(a), json.dumps(b),
                     int(label == 0), int(label == 1), int(label == 2)])
    # 0.5% exact duplicates (new id, same texts); a third of them with another label
    for j in range(n // 200):
        src = list(rows[int(rng.integers(n))])
        src[0] = str(20_000_000 + j)
        if j % 3 == 0:
            label = (int(np.argmax(src[6:9])) + 1) % 3
            src[6:9] = [int(label == 0), int(label == 1), int(label == 2)]
        rows[int(rng.integers(n))] = src
    return rows


def write_csv(rows: list[list], path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\r\n")  # quotes every cell holding \r or \n
        writer.writerow(COLUMNS)
        writer.writerows(rows)


class _Clock:
    """Wall seconds and CPU seconds of this process (the machine may be shared: CPU time is the
    steadier number, wall time the one the target is about)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_stages(path: Path, n_folds: int = 4) -> dict[str, float]:
    times: dict[str, float] = {}
    with _Clock() as c:
        raw = read_table(path)
    times["read_table"], times["read_table_cpu"] = c.wall, c.cpu
    with _Clock() as c:
        clean, report = clean_frame(raw, file=str(path), labelled=True)
    times["clean_frame"], times["clean_frame_cpu"] = c.wall, c.cpu
    del raw
    with _Clock() as c:
        processed, info = build_processed(clean, [], n_folds=n_folds, seed=42)
    times["build_processed"], times["build_processed_cpu"] = c.wall, c.cpu
    times["total"] = times["read_table"] + times["clean_frame"] + times["build_processed"]
    times["total_cpu"] = times["read_table_cpu"] + times["clean_frame_cpu"] + times["build_processed_cpu"]
    times["rows_out"] = len(processed)
    times["removed"] = sum(report.removed.values())
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--profile", action="store_true", help="cProfile the largest size, print the top 25")
    parser.add_argument("--keep", type=Path,
                        help="write the CSV files into this folder and re-use them when present (else a temp dir)")
    args = parser.parse_args(argv)
    from gpu_jobs.precision import hardware_summary

    print(hardware_summary(), flush=True)  # the figures below belong to this hardware

    from sklearn.model_selection import StratifiedGroupKFold  # noqa: F401 - import once, outside the timings

    results = []
    with tempfile.TemporaryDirectory(prefix="arena-scaling-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for n in args.rows:
            path = folder / f"train_{n}.csv"
            t = time.perf_counter()
            if not (args.keep and path.exists()):  # --keep: re-use the files of an earlier run
                rows = make_rows(n)
                write_csv(rows, path)
                del rows
            gen_s = time.perf_counter() - t
            size_mb = path.stat().st_size / 1e6
            gc.collect()
            if args.profile and n == max(args.rows):
                profiler = cProfile.Profile()
                profiler.enable()
                times = run_stages(path, args.folds)
                profiler.disable()
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
            else:
                times = run_stages(path, args.folds)
            results.append((n, size_mb, gen_s, times))
            print(f"{n:>8} rows  {size_mb:7.1f} MB  generated in {gen_s:5.1f} s  -> total {times['total']:6.2f} s",
                  flush=True)
            gc.collect()

    stages = ["read_table", "clean_frame", "build_processed", "total"]
    print("\nseconds per stage: wall (CPU of this process)")
    print(f"{'rows':>8} {'MB':>7} " + " ".join(f"{s:>17}" for s in stages) + f" {'rows/s':>9} {'removed':>8}")
    for n, size_mb, _, times in results:
        cells = [f"{times[s]:7.2f} ({times[s + '_cpu']:6.2f})" for s in stages]
        print(f"{n:>8} {size_mb:7.1f} " + " ".join(f"{c:>17}" for c in cells)
              + f" {n / times['total']:9.0f} {int(times['removed']):>8}")
    if len(results) > 1:
        (n0, _, _, t0), (n1, _, _, t1) = results[0], results[-1]
        ratio = (t1["total_cpu"] / t0["total_cpu"]) / (n1 / n0)
        verdict = "roughly linear" if 0.6 <= ratio <= 1.5 else ("super-linear" if ratio > 1.5 else "sub-linear")
        print(f"\nCPU time per row at {n1} rows / at {n0} rows = {ratio:.2f} ({verdict})")
        for s in stages[:-1]:
            r = (t1[s + "_cpu"] / max(t0[s + "_cpu"], 1e-9)) / (n1 / n0)
            print(f"  {s:<16} {r:5.2f}")
    largest = results[-1]
    if largest[0] >= 200_000:
        ok = largest[3]["total"] < 60
        print(f"\n{largest[0]} rows in {largest[3]['total']:.1f} s wall ({largest[3]['total_cpu']:.1f} s CPU): "
              f"{'within' if ok else 'OVER'} the 60 s target")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
