"""Out-of-fold predictions per (stage, model, fold): each fold's training job is launched as a separate
`accelerate launch -m gpu_jobs.train` process through Dagster Pipes, then recorded in MLflow.

One asset per (stage, model config), partitioned by fold, so a single (model, fold) can be rebuilt alone
from the UI (pick a partition) or the CLI (``--tags '{"dagster/partition": "0"}'``).
"""


import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import yaml

from arena_pipeline import plots
from arena_pipeline.profile import ModelSpec, Profile
from arena_pipeline.data.folds import label_index
from arena_pipeline.partitions import fold_partitions, run_folds
from arena_pipeline.resources.launching import Launcher
from arena_pipeline.resources.storage import ArenaStorage, atomic_write_json, atomic_write_parquet, file_version
from gpu_jobs.contract.schema import LABEL_COLUMNS, PROB_COLUMNS, TARGET_COLUMNS, WEIGHT_COLUMN
from arena_pipeline.resources.tracking import MlflowTracking

STAGE1, STAGE2 = "stage1", "stage2"
REPORTED = ("val_log_loss", "val_accuracy", "val_loss_a", "val_loss_b", "val_loss_tie",
            "train_examples_per_s", "predict_examples_per_s", "wall_s", "n_train", "n_val", "final_train_loss")


def oof_asset_name(stage: str, model: str) -> str:
    return f"{stage}_oof_{model}"


def job_config_path(out: Path) -> Path:
    """Where a job's one resolved config file goes: next to its output folder (``OUT.config.yaml``)."""
    return out.with_name(out.name + ".config.yaml")


def job_args(spec: ModelSpec, fold: int, data: Path, out: Path, extra=()) -> list[str]:
    """``gpu_jobs.train`` arguments: the member's resolved config (base YAML + the profile's overrides +
    ``extra``, validated) written to one file, passed as ``--config``."""
    config = spec.write_config(job_config_path(out), extra)
    return ["--config", str(config), "--fold", str(fold), "--data", str(data), "--output-dir", str(out)]


def read_history(out: Path) -> list[dict]:
    path = out / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def resolved_config(out: Path) -> dict:
    path = out / "model" / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def stage2_training_data(storage: ArenaStorage, processed_folds: Path, fold: int, pseudo_weight: float) -> Path:
    """Human rows (one-hot targets) + fold K's pseudo-labelled rows (soft targets, train only)."""
    human = pd.read_parquet(processed_folds)
    y = label_index(human)
    targets = np.eye(3)[y]
    human = human.assign(target_a=targets[:, 0], target_b=targets[:, 1], target_tie=targets[:, 2], sample_weight=1.0)
    pseudo = pd.read_parquet(storage.pseudo_labels(fold))
    pseudo = pseudo.assign(fold=-1, sample_weight=float(pseudo_weight))
    keep = ["id", "prompt", "response_a", "response_b", "model_a", "model_b", "source", "group", "fold",
            *TARGET_COLUMNS, WEIGHT_COLUMN]
    combined = pd.concat([human[keep + list(LABEL_COLUMNS)], pseudo[keep]], ignore_index=True)
    for column in LABEL_COLUMNS:
        combined[column] = combined[column].fillna(-1).astype("int8")  # -1: no human label (pseudo rows)
    return atomic_write_parquet(combined, storage.scratch("stage2") / f"train_fold{fold}.parquet")


@contextmanager
def launched_training(context: dg.AssetExecutionContext, launcher: Launcher, mlflow: MlflowTracking, stage: str,
                      spec: ModelSpec, fold: int, data: Path, out: Path, extra=(), *, params: dict | None = None,
                      tags: dict | None = None, record: dict | None = None):
    """One ``gpu_jobs.train`` launch of ``spec`` holding out ``fold`` of ``data`` into ``out``, inside its MLflow
    job run; yields ``(run, result, metrics)`` with ``out/job.json`` written (stage, model, held-out fold, data and
    its version, Dagster and MLflow run ids, plus ``record``). The caller logs the run's results."""
    shutil.rmtree(out, ignore_errors=True)  # a stale result must never pass for this run's
    data_version = file_version(Path(data))
    with mlflow.job_run(context, stage=stage, model=spec.name, fold=fold,
                        params={"config_file": str(spec.config_path), "overrides": spec.override_items(),
                                **(params or {})},
                        tags={"data_version": data_version, **(tags or {})}) as run:
        result = launcher.run(context, "gpu_jobs.train", job_args(spec, fold, data, out, extra),
                              extras={"stage": stage, "model": spec.name, "fold": fold},
                              on_message=run.on_message, **spec.launch_options)
        metrics = json.loads((out / "metrics.json").read_text())
        atomic_write_json({"stage": stage, "model": spec.name, "fold": fold, "data": str(data),
                           "data_version": data_version, "dagster_run_id": context.run_id,
                           "mlflow_run_id": run.run_id, "wall_s_with_launch": result.wall_s, **(record or {})},
                          out / "job.json")
        yield run, result, metrics


def fold_plots(out: Path, processed: pd.DataFrame, title: str) -> dict[str, Path]:
    oof = pd.read_parquet(out / "oof.parquet")
    truth = processed.set_index("id").loc[oof["id"]]
    y = label_index(truth.reset_index())
    probs = oof[list(PROB_COLUMNS)].to_numpy()
    folder = out / "plots"
    return {
        "confusion_matrix": plots.confusion_matrix(y, probs, folder / "confusion_matrix.png", title),
        "reliability": plots.reliability_diagram(y, probs, folder / "reliability.png", title),
    }


def build_oof_asset(stage: str, spec: ModelSpec, profile: Profile) -> dg.AssetsDefinition:
    name = oof_asset_name(stage, spec.name)
    deps = [] if stage == STAGE1 else ["pseudo_labels"]  # processed_folds: an input (the IO manager's path)
    student = stage == STAGE1 and spec.distill is not None
    if student:  # trains on its teacher's soft targets (assets/distillation.py)
        from arena_pipeline.assets.distillation import student_training_data, targets_asset_name

        deps.append(targets_asset_name(spec.name))

    class OofConfig(dg.Config):
        use_hpo: bool = False  # opt-in: train with the best trial of hpo_<model> (hpo/<model>/best.json)

    @dg.asset(
        name=name,
        group_name=stage,
        deps=deps,
        partitions_def=fold_partitions(profile),
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool="gpu",
        kinds={*spec.family.kinds, "mlflow"},
        description=f"{stage} out-of-fold predictions of '{spec.name}' ({spec.config}); one partition per fold. "
                    "Each fold trains in its own `accelerate launch -m gpu_jobs.train` process."
                    + (f" A student of {list(spec.distill.teacher)}: trains on the soft targets of "
                       f"{targets_asset_name(spec.name)}." if student else ""),
        tags={"stage": stage, "model": spec.name},
    )
    def _oof(context: dg.AssetExecutionContext, config: OofConfig, storage: ArenaStorage, launcher: Launcher,
             mlflow: MlflowTracking, processed_folds: Path) -> dg.MaterializeResult:
        hpo_extra, hpo = [], None
        if config.use_hpo:
            from arena_pipeline.assets.hpo import hpo_overrides

            hpo_extra, hpo = hpo_overrides(storage, spec.name)
            context.log.info(f"{name}: best trial {hpo['trial']} of study {hpo['study']}: {hpo_extra}")
        processed = pd.read_parquet(processed_folds)
        per_fold: dict[str, dict] = {}
        images: dict[str, dg.MetadataValue] = {}
        links: dict[str, str] = {}
        for fold in run_folds(context):
            if student:
                data = student_training_data(storage, processed_folds, spec.name, fold)
            elif stage == STAGE1:
                data = processed_folds
            else:
                data = stage2_training_data(storage, processed_folds, fold, profile.pseudo_weight)
            out = storage.job_dir(stage, spec.name, fold)
            with launched_training(context, launcher, mlflow, stage, spec, fold, data, out, hpo_extra,
                                   params={"hpo_overrides": hpo_extra},
                                   tags={"hpo_study": hpo["study"], "hpo_trial": str(hpo["trial"])} if hpo else None
                                   ) as (run, result, metrics):
                pngs = fold_plots(out, processed, f"{stage}/{spec.name} fold {fold}")
                run.log_result({**metrics, "wall_s_with_launch": result.wall_s}, params=resolved_config(out),
                               history=read_history(out),
                               artifacts=[out / "model" / "config.yaml", out / "metrics.json", *pngs.values()])
            link = run.link
            per_fold[str(fold)] = {k: metrics[k] for k in REPORTED if k in metrics}
            per_fold[str(fold)]["wall_s_with_launch"] = round(result.wall_s, 1)
            links[str(fold)] = link
            for key, png in pngs.items():
                images[f"{key}_fold{fold}"] = plots.as_metadata(png, mlflow.artifact_url(run.run_id, png.name))
            context.log.info(f"{name} fold {fold}: val_log_loss={metrics.get('val_log_loss')} "
                             f"({result.wall_s:.0f}s)")
        metadata: dict = {"folds": dg.MetadataValue.json(per_fold), "mlflow_runs": dg.MetadataValue.json(links)}
        if hpo:
            metadata["hpo"] = dg.MetadataValue.json({k: hpo[k] for k in ("study", "trial", "val_log_loss", "overrides")})
        if len(per_fold) == 1:
            (fold_key, only), = per_fold.items()
            metadata.update({k: float(v) for k, v in only.items() if v is not None})
            metadata["mlflow_run"] = dg.MetadataValue.url(links[fold_key])
        else:
            metadata["mean_val_log_loss"] = float(np.mean([m["val_log_loss"] for m in per_fold.values()]))
        metadata.update(images)
        return dg.MaterializeResult(metadata=metadata)

    return _oof


def build_oof_assets(stage: str, profile: Profile) -> list[dg.AssetsDefinition]:
    models = profile.models if stage == STAGE1 else profile.stage2_models
    return [build_oof_asset(stage, spec, profile) for spec in models]
