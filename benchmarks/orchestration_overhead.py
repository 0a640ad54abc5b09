"""Orchestration overhead: one training job run bare vs. materialised through Dagster + Pipes + MLflow.

    .venv/bin/python benchmarks/orchestration_overhead.py [--models features cross_encoder_minilm] [--repeats 2]

Both sides run the same job of the smoke profile (``arena_pipeline.profile.SMOKE``: its one resolved config
file) on the same ``processed_folds.parquet``, fold 0:

- bare: ``python -m accelerate.commands.launch --config_file cpu_single.yaml -m gpu_jobs.train ...`` as a
  subprocess, nothing else;
- orchestrated: ``dg.materialize`` of ``stage1_oof_<model>`` partition 0 in this (warm) process against a
  sqlite Dagster instance: the same command started by the Pipes launcher, its logs streamed into the run log,
  Pipes metadata, then the asset's own work (job.json, plots, one MLflow run with params, metrics, history and
  artifacts) and Dagster's event writes.

Runs alternate (bare first, then orchestrated first) so drift in a shared machine's load hits both sides.
Prints every wall time, the medians, the overhead and the target: overhead <= 10 % of the bare run + 5 s.
The orchestrated time is split into the job program's own ``wall_s`` (metrics.json), the launch (process
start, imports, accelerate launch: ``wall_s_with_launch - wall_s``) and the asset's work after the job.
The one-off costs of a run worker (importing dagster and the definitions, ~5-10 s) are not in either figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bare(spec, data: Path, out: Path, accelerate_config: Path) -> float:
    from arena_pipeline.assets.oof import job_args

    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
           "-m", "gpu_jobs.train", *job_args(spec, 0, data, out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bare run failed:\n{proc.stderr[-3000:]}")
    return wall


def orchestrated(defs, model: str, instance, storage) -> dict:
    from arena_pipeline_tests.reliability_support import materialise

    t0 = time.perf_counter()
    result = materialise(defs, [f"stage1_oof_{model}"], instance, partition_key="0")
    wall = time.perf_counter() - t0
    if not result.success:
        raise SystemExit(f"orchestrated run of {model} failed")
    out = storage.job_dir("stage1", model, 0)
    job_wall = json.loads((out / "metrics.json").read_text())["wall_s"]
    with_launch = json.loads((out / "job.json").read_text())["wall_s_with_launch"]
    return {"wall": wall, "job": job_wall, "launch": with_launch - job_wall, "after": wall - with_launch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["features", "cross_encoder_minilm"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the temporary state folder")
    args = parser.parse_args()
    from gpu_jobs.precision import hardware_summary

    print(hardware_summary(), flush=True)  # the figures below belong to this hardware

    home = Path(tempfile.mkdtemp(prefix="arena_overhead_"))
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import dagster as dg

    from arena_pipeline.profile import SMOKE
    from arena_pipeline.definitions import build_definitions
    from arena_pipeline.resources.storage import ArenaStorage
    from arena_pipeline_tests.reliability_support import materialise_inputs

    defs = build_definitions(SMOKE)
    storage = ArenaStorage()
    rows = []
    try:
        with dg.DagsterInstance.get() as instance:
            materialise_inputs(defs, instance)  # processed_folds, MLflow store: not timed
            data = storage.data("processed_folds")
            for model in args.models:
                spec = SMOKE.model(model)
                bare_s, orch = [], []
                for i in range(args.repeats):
                    order = ("bare", "orch") if i % 2 == 0 else ("orch", "bare")
                    for side in order:
                        if side == "bare":
                            bare_s.append(bare(spec, data, home / "bare" / model, SMOKE.accelerate_config_path))
                        else:
                            orch.append(orchestrated(defs, model, instance, storage))
                        print(f"  {model} {side}: {bare_s[-1] if side == 'bare' else orch[-1]['wall']:.1f}s",
                              flush=True)
                rows.append((model, bare_s, orch))
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)

    cores = os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\norchestration overhead, smoke-profile jobs, fold 0, {args.repeats} run(s) each side, "
          f"{cores} cores, load average {load:.1f} at the end")
    header = (f"{'model':<22}{'bare s':>16}{'dagster s':>18}{'median bare':>13}{'median dagster':>16}"
              f"{'overhead':>11}{'%':>7}{'budget':>9}  ok")
    print(header)
    print("-" * len(header))
    for model, bare_s, orch in rows:
        mb, mo = statistics.median(bare_s), statistics.median(o["wall"] for o in orch)
        overhead = mo - mb
        budget = 0.10 * mb + 5.0
        bare_txt = " ".join(f"{x:.1f}" for x in bare_s)
        orch_txt = " ".join(f"{o['wall']:.1f}" for o in orch)
        print(f"{model:<22}{bare_txt:>16}{orch_txt:>18}{mb:>13.1f}{mo:>16.1f}"
              f"{overhead:>10.1f}s{100 * overhead / mb:>6.0f}%{budget:>8.1f}s  {'yes' if overhead <= budget else 'NO'}")
    print("\norchestrated run split (median): job program wall_s | launch (start, imports, accelerate) | asset work "
          "after the job (job.json, plots, MLflow, events)")
    for model, _, orch in rows:
        print(f"{model:<22}{statistics.median(o['job'] for o in orch):>8.1f}s |"
              f"{statistics.median(o['launch'] for o in orch):>8.1f}s |{statistics.median(o['after'] for o in orch):>8.1f}s")


if __name__ == "__main__":
    main()
