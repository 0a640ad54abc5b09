"""Fold-0 log loss of a distilled student vs the same member trained plain on the same rows (README "Distillation").

    PYTHONPATH=. python benchmarks/distill_fold0.py OUT [--student-config cross_encoder_minilm.yaml] \
        [--teacher features] [--alpha 0.5] [--set training.max_train_rows=300 training.max_length=128 ...]

Writes a profile (the demo's data and row caps, 4 folds, fold 0) with three members: the teacher(s), the student
config as a plain member (``plain``) and as a student (``student``, same overrides, ``distill:``), then
materialises through Dagster, on partition 0: the data assets, ``distill_targets_student`` (nested teacher jobs),
``stage1_oof_plain`` and ``stage1_oof_student``. ``max_train_rows`` samples the same rows for both (same seed,
same training rows: every row with fold != 0). Prints one JSON line: the val log loss of each, the teacher's,
and the wall time of each asset.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import dagster as dg
import yaml

from arena_pipeline.profile import DEMO, load_profile


def parse_set(items: list[str]) -> dict:
    out: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--student-config", default="cross_encoder_minilm.yaml")
    p.add_argument("--teacher", nargs="+", default=["features"], help="teacher member configs (name = file stem)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--set", nargs="*", default=[], dest="overrides")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    overrides = parse_set(args.overrides)
    teachers = [{"name": Path(t).stem, "config": t if t.endswith(".yaml") else f"{t}.yaml"} for t in args.teacher]
    profile_file = args.out / "profile.yaml"
    profile_file.write_text(yaml.safe_dump({
        "name": "distill_fold0",
        "models": [*teachers,
                   {"name": "plain", "config": args.student_config, "overrides": overrides},
                   {"name": "student", "config": args.student_config, "overrides": overrides,
                    "distill": {"teacher": [t["name"] for t in teachers], "alpha": args.alpha}}],
        "n_folds": DEMO.n_folds, "folds": [0], "max_labelled_rows": DEMO.max_labelled_rows,
    }))
    profile = load_profile(profile_file)

    from arena_pipeline.checks import build_distillation_checks
    from arena_pipeline.definitions import build_definitions, build_resources
    from arena_pipeline.resources.storage import ArenaStorage
    from arena_pipeline.resources.tracking import MlflowTracking

    defs = build_definitions(profile)
    resources = {**build_resources(profile), "storage": ArenaStorage(home=str(args.out / "arena")),
                 "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{args.out / 'mlflow.db'}")}
    assets = list(defs.assets)
    dg.materialize(assets, selection=["raw_labelled", "raw_external", "processed_folds"], resources=resources)
    walls, results = {}, {}
    for name in ["distill_targets_student", "stage1_oof_plain", "stage1_oof_student"]:
        t0 = time.perf_counter()
        result = dg.materialize([*assets, *build_distillation_checks(profile)], selection=[name], partition_key="0",
                                resources=resources)
        walls[name] = round(time.perf_counter() - t0, 1)
        results[name] = {k: v.value for k, v in result.asset_materializations_for_node(name)[0].metadata.items()}
    storage = resources["storage"]
    report = {
        "plain_val_log_loss": results["stage1_oof_plain"]["val_log_loss"],
        "student_val_log_loss": results["stage1_oof_student"]["val_log_loss"],
        "teacher_log_loss_on_student_training_rows": results["distill_targets_student"]["teacher_log_loss"],
        "teacher_jobs": results["distill_targets_student"]["teacher_jobs"],
        "n_train": {k: results[f"stage1_oof_{k}"]["n_train"] for k in ("plain", "student")},
        "n_val": results["stage1_oof_plain"]["n_val"],
        "wall_s": walls, "alpha": args.alpha, "teacher": args.teacher, "overrides": overrides,
        "storage": str(storage.root),
    }
    print(json.dumps(report))
    (args.out / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
