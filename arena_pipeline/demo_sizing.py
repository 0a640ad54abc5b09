"""Fit a profile with a time budget (the `demo`) to the CPU it meets, from a short throughput probe.

The demo's sizes were chosen on a 2-core CPU with native bf16, where it takes ~12 minutes. On a CPU without
bf16 kernels the neural members train in fp32 (gpu_jobs.precision) and run several times slower, so before
the run each neural member is probed (``python -m gpu_jobs.probe``: two training steps and a prediction pass
in its own process, at the member's lengths and precision), its whole cost is estimated from the rows it
will train on and predict, and when the total does not fit, every neural member's ``training.max_train_rows``
is scaled down by one common factor (never below ``MIN_TRAIN_ROWS``; a stage-1-only member that cannot fit
even then is left out). What was chosen and why is printed, and the fold-0 figures of such a run are
figures of the smaller members.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from arena_pipeline.profile import REPO_ROOT, ModelSpec, Profile

MIN_TRAIN_ROWS = 64
PLAN_SHARE = 0.85  # plan to 85 % of the budget: the probe is an estimate
# Time the rest of the demo graph takes besides the neural members (data, generation, features, ensembles,
# pseudo labels, bundle, launches), measured on 2-core EPYCs: ~110 s with native bf16 (vLLM start-up 72 s),
# ~300 s without (vLLM start-up 209 s and 77 tokens/s in fp32; issue #12).
OTHER_WORK_S = {"bf16": 110.0, "fp32": 300.0}


@dataclass
class Probe:
    name: str
    precision: str
    load_s: float
    train_s_per_example: float
    predict_s_per_example: float


@dataclass
class MemberCost:
    spec: ModelSpec
    probe: Probe
    train_rows: int
    predict_rows: int
    jobs: int  # training jobs (one per stage it runs in)

    def seconds(self, train_rows: int | None = None) -> float:
        rows = self.train_rows if train_rows is None else train_rows
        return self.jobs * (self.probe.load_s + rows * self.probe.train_s_per_example) \
            + self.predict_rows * self.probe.predict_s_per_example


def _rows(path: str) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def _job_config(spec: ModelSpec):
    """The member's job config with the profile's overrides applied: the job programs' own loader."""
    return spec.job_config()


def run_probe(spec: ModelSpec, data: str, rows: int = 4) -> Probe:
    """``python -m gpu_jobs.probe`` for one member, as its own process (model work stays out of this one), on
    the member's one resolved config file."""
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
        config = spec.write_config(Path(tmp) / f"{spec.name}.yaml")
        cmd = [sys.executable, "-m", "gpu_jobs.probe", "--config", str(config), "--data", data, "--rows", str(rows)]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"throughput probe of {spec.name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return Probe(spec.name, data["precision"], data["load_s"], data["train_s_per_example"],
                 data["predict_s_per_example"])


def member_costs(profile: Profile, probes: dict[str, Probe]) -> list[MemberCost]:
    """Rows each neural member trains on and predicts in this profile (stage 1, and stage 2 if it runs there)."""
    labelled = min(profile.max_labelled_rows or math.inf, sum(_rows(p) for p in profile.data.labelled))
    external = sum(min(profile.max_external_rows or math.inf, _rows(p)) for p in profile.data.external)
    pool = min(profile.max_unlabelled_rows or math.inf, sum(_rows(p) for p in profile.data.unlabelled)) \
        + profile.n_generate_prompts
    val = labelled / profile.n_folds * len(profile.folds)
    train = labelled * (profile.n_folds - 1) / profile.n_folds + external
    costs = []
    for spec in profile.models:
        if spec.name not in probes:
            continue
        cfg = _job_config(spec)
        cap = cfg.training.max_train_rows or math.inf
        views = 2 if cfg.tta else 1
        rows = int(min(cap, train))
        predict = (val + pool) * views + (val * views if spec.stage2 else 0)  # OOF, pseudo-label pool, stage 2
        costs.append(MemberCost(spec, probes[spec.name], rows, int(predict), 2 if spec.stage2 else 1))
    return costs


def plan(profile: Profile, costs: list[MemberCost], budget_s: float, spent_s: float = 0.0) -> tuple[Profile, list[str]]:
    """The profile with training rows scaled to fit ``budget_s`` (of which ``spent_s`` already went on the
    probe), and lines saying what was chosen and why."""
    precision = costs[0].probe.precision if costs else "bf16"
    other = OTHER_WORK_S.get(precision, OTHER_WORK_S["fp32"])
    available = budget_s * PLAN_SHARE - other - spent_s
    lines = [f"time budget {budget_s / 60:.0f} min; neural members run in {precision}; planned "
             f"{available:.0f} s for them ({PLAN_SHARE:.0%} of the budget, less ~{other:.0f} s for the rest of the "
             f"graph and {spent_s:.0f} s of probing)"]
    for c in costs:
        lines.append(f"  probe {c.spec.name}: {c.probe.train_s_per_example:.3f} s/train example, "
                     f"{c.probe.predict_s_per_example:.3f} s/prediction, load {c.probe.load_s:.0f} s -> "
                     f"{c.train_rows} training rows x {c.jobs} job(s) ~ {c.seconds():.0f} s")
    kept, dropped = list(costs), set()
    factor = 1.0
    while kept:
        fixed = sum(c.seconds(0) for c in kept)
        trainable = sum(c.seconds() - c.seconds(0) for c in kept)
        factor = min(1.0, (available - fixed) / trainable) if trainable > 0 else 1.0
        starved = [c for c in kept if not c.spec.stage2 and factor * c.train_rows < MIN_TRAIN_ROWS]
        if not starved:
            break
        victim = max(starved, key=lambda c: c.seconds())
        lines.append(f"  leaving out {victim.spec.name}: at {MIN_TRAIN_ROWS} rows or fewer it would learn nothing")
        kept.remove(victim)
        dropped.add(victim.spec.name)
    new_rows = {}
    if factor < 1.0:
        new_rows = {c.spec.name: max(MIN_TRAIN_ROWS, int(factor * c.train_rows)) for c in kept}
        lines.append(f"  scaled training rows by {max(factor, 0):.2f} to fit: " +
                     ", ".join(f"{c.spec.name} {c.train_rows} -> {new_rows[c.spec.name]}" for c in kept) +
                     f" (estimated {sum(c.seconds(new_rows[c.spec.name]) for c in kept):.0f} s)")
    else:
        lines.append(f"  estimated {sum(c.seconds() for c in kept):.0f} s for the neural members: "
                     + ("they fit at the profile's sizes" if not dropped else "the others fit at the profile's sizes"))
    if new_rows or dropped:
        lines.append("  the fold-0 figures of this run are those of this smaller demo, not of the profile's own sizes")
    models = tuple(
        spec.with_overrides({"training": {"max_train_rows": new_rows[spec.name]}})
        if spec.name in new_rows else spec
        for spec in profile.models if spec.name not in dropped)
    return dataclasses.replace(profile, models=models), lines


def fit_to_budget(profile: Profile, budget_s: float, log=print) -> Profile:
    """Probe every neural member of ``profile`` and return it sized to ``budget_s`` (printing the plan)."""
    neural = [s for s in profile.models if s.family.neural]
    log(f"sizing '{profile.name}' to {budget_s / 60:.0f} minutes: probing {len(neural)} neural member(s) ...")
    t0 = time.perf_counter()
    probes = {s.name: run_probe(s, profile.data.labelled[0]) for s in neural}
    sized, lines = plan(profile, member_costs(profile, probes), budget_s, spent_s=time.perf_counter() - t0)
    for line in lines:
        log(line)
    return sized
