"""Soft pseudo labels on the unlabelled pool from the stage-1 ensemble, one file per fold.

No leakage, by construction and checked (`checks.pseudo_labels_no_leakage`):
- fold K's pseudo labels come only from the stage-1 models of fold K, which never trained on fold K's
  labelled rows (each job records its held-out fold in ``job.json``);
- pool pairs whose prompt group occurs in fold K's validation rows are left out of fold K's file.
The stage-1 models score the pool with `gpu_jobs.predict` (a separate process, like training), so a
new pool is labelled without retraining stage 1.
"""


import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from arena_pipeline import blending as ens
from arena_pipeline import plots
from arena_pipeline.assets.oof import STAGE1
from arena_pipeline.profile import Profile
from arena_pipeline.resources.launching import Launcher
from arena_pipeline.resources.storage import ArenaStorage, atomic_write_json, atomic_write_parquet
from arena_pipeline.resources.tracking import MlflowTracking
from gpu_jobs.contract.schema import PROB_COLUMNS, TARGET_COLUMNS

GROUP = "pseudo_labelling"
TARGETS = list(TARGET_COLUMNS)
PROBS = list(PROB_COLUMNS)


def teachers_file(storage: ArenaStorage, fold: int) -> Path:
    return storage.pseudo_labels(fold).with_suffix(".teachers.json")


def pool_for_fold(pool: pd.DataFrame, processed: pd.DataFrame, fold: int) -> pd.DataFrame:
    """Pool pairs whose prompt is not among fold K's validation prompts."""
    val_groups = set(processed.loc[processed["fold"] == fold, "group"])
    return pool[~pool["group"].isin(val_groups)].reset_index(drop=True)


def leakage_report(storage: ArenaStorage, processed_folds: Path, folds: tuple[int, ...]) -> dict:
    """Both leakage rules and the soft-label sums, per fold; ``passed`` only when all hold."""
    processed = pd.read_parquet(processed_folds)
    report: dict = {"passed": True, "folds": {}}
    for fold in folds:
        pseudo = pd.read_parquet(storage.pseudo_labels(fold))
        val_groups = set(processed.loc[processed["fold"] == fold, "group"])
        leaked_prompts = int(pseudo["group"].isin(val_groups).sum())
        teachers = json.loads(teachers_file(storage, fold).read_text())
        wrong_teachers = []
        for teacher in teachers:
            job = json.loads((Path(teacher["job_dir"]) / "job.json").read_text())
            if int(job["fold"]) != fold or job["stage"] != STAGE1:
                wrong_teachers.append({"model": teacher["model"], "held_out_fold": job["fold"], "stage": job["stage"]})
        wrong_teacher_column = int((pseudo["teacher_fold"] != fold).sum())
        sums = pseudo[TARGETS].sum(axis=1).to_numpy()
        bad_sums = int((np.abs(sums - 1) > 1e-6).sum()) + int((pseudo[TARGETS].to_numpy() < 0).sum())
        ok = leaked_prompts == 0 and not wrong_teachers and wrong_teacher_column == 0 and bad_sums == 0
        report["folds"][str(fold)] = {"rows": len(pseudo), "rows_with_validation_prompt": leaked_prompts,
                                      "teachers_trained_on_this_fold": wrong_teachers,
                                      "rows_with_other_teacher_fold": wrong_teacher_column,
                                      "rows_not_summing_to_one": bad_sums, "passed": ok}
        report["passed"] = report["passed"] and ok
    return report


def build_pseudo_label_asset(profile: Profile) -> dg.AssetsDefinition:
    class PseudoConfig(dg.Config):
        ensemble: str = "stage1_ensemble"

    @dg.asset(group_name=GROUP, deps=["stage1_ensemble"], pool="gpu",
              kinds={"parquet"},
              description="Soft labels (no threshold) on the unlabelled pool from the stage-1 ensemble, per fold, "
                          "leak-free by construction and by blocking check.")
    def pseudo_labels(context: dg.AssetExecutionContext, config: PseudoConfig, storage: ArenaStorage,
                      launcher: Launcher, mlflow: MlflowTracking, processed_folds: Path, unlabelled_pairs: Path):
        spec = json.loads(storage.ensemble(config.ensemble).read_text())
        weights = {name: w for name, w in spec["weights"].items() if w > 0}
        members = [m for m in spec["members"] if m["name"] in weights]
        processed = pd.read_parquet(processed_folds)
        pool = pd.read_parquet(unlabelled_pairs)
        metadata: dict = {}
        all_targets = []
        for fold in profile.folds:
            pool_k = pool_for_fold(pool, processed, fold)
            pool_path = atomic_write_parquet(pool_k, storage.scratch("pseudo") / f"pool_fold{fold}.parquet")
            teachers, probs = [], {}
            for model in sorted({m["model"] for m in members}):
                job_dir = storage.job_dir(STAGE1, model, fold)
                out = storage.pool_predictions(model, fold)
                want_tta = any(m["model"] == model and m["tta"] for m in members)
                args = ["--model-dir", str(job_dir / "model"), "--data", str(pool_path), "--output", str(out)]
                with mlflow.job_run(context, stage="pseudo", model=model, fold=fold, kind="prediction",
                                    params={"tta": want_tta, "pool_rows": len(pool_k)}) as run:
                    result = launcher.run(context, "gpu_jobs.predict", args + (["--tta"] if want_tta else []),
                                          extras={"model": model, "fold": fold}, on_message=run.on_message,
                                          **profile.model(model).launch_options)
                    run.log_result({**result.metadata, "wall_s_with_launch": result.wall_s})
                teachers.append({"model": model, "job_dir": str(job_dir)})
                for m in members:
                    if m["model"] != model:
                        continue
                    path = out.with_name(out.stem + "_tta.parquet") if m["tta"] else out
                    frame = pd.read_parquet(path).set_index("id").loc[pool_k["id"]]
                    probs[m["name"]] = frame[PROBS].to_numpy()
            targets = ens.apply_temperature(ens.blend(probs, weights), spec["temperature"])
            targets = targets / targets.sum(axis=1, keepdims=True)
            labelled = pool_k.assign(**{t: targets[:, i] for i, t in enumerate(TARGETS)}, teacher_fold=fold)
            atomic_write_json(teachers, teachers_file(storage, fold))
            atomic_write_parquet(labelled, storage.pseudo_labels(fold))
            all_targets.append(targets)
            metadata[f"fold{fold}_rows"] = len(labelled)
            metadata[f"fold{fold}_pool_rows_held_out"] = len(pool) - len(pool_k)
        targets = np.concatenate(all_targets)
        png = plots.entropy_histogram(targets, storage.scratch("plots") / "pseudo_entropy.png")
        metadata.update({
            "label_balance": dg.MetadataValue.json({t: round(float(targets[:, i].mean()), 4) for i, t in enumerate(TARGETS)}),
            "mean_entropy": float(-(np.clip(targets, 1e-12, 1) * np.log(np.clip(targets, 1e-12, 1))).sum(1).mean()),
            "pairs_per_source": dg.MetadataValue.json(pool["source"].value_counts().to_dict()),
            "teacher_members": dg.MetadataValue.json(weights),
            "entropy_histogram": mlflow.log_pipeline_artifact(context, png),
        })
        return dg.MaterializeResult(metadata=metadata)

    return pseudo_labels
