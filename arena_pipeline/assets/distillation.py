"""Distillation: a stage-1 student trained per fold on a teacher's soft targets mixed with the human label.

A member with ``distill: {teacher: [features], alpha: 0.5}`` in its profile entry is a student. For outer
fold K its training rows (every row with fold != K, external fold -1 rows included) get the targets

    alpha * teacher + (1 - alpha) * one-hot(human label),

where ``teacher`` is the plain (unweighted) mean of the teacher members' probabilities, renormalised to sum to 1
(no TTA twin, no temperature). External rows (fold -1) are always training rows of every teacher, so no teacher
can predict them without having seen their label: they keep their one-hot target and no teacher provenance.

The leak rule: the student's model for validation fold K must never see targets from a teacher that trained
on fold K. Plain stage-1 OOF breaks it (the teacher's prediction for a row of fold j came from a model trained
on every fold but j, K included), so the teacher's predictions are *nested*: for outer fold K and each inner
fold j != K, each teacher member trains on the folds not in {K, j} (a data file without fold K's rows, held-out
fold j) and predicts fold j. That is (n_folds - 1) `gpu_jobs.train` launches per teacher member per outer fold,
n_folds * (n_folds - 1) for all folds, each a real job through the launcher (gpu pool, MLflow job run tagged
``outer_fold`` and ``student``, ``job.json`` recording the folds it trained on). No change to the job contract:
fold K is simply absent from the teacher's data file.

One targets asset per student (``distill_targets_<student>``, fold-partitioned): the teacher list and alpha are
the student's, and each student's teacher jobs write under their own folder, so two students never write the
same files. Its lineage is processed_folds + each teacher's ``stage1_oof_<teacher>`` -> targets -> the student's
``stage1_oof_<student>``; the blocking check ``distill_targets_no_leakage`` reads every row's provenance and the
teacher jobs' ``job.json``.
"""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from arena_pipeline.assets.oof import STAGE1, launched_training, oof_asset_name, read_history, resolved_config
from arena_pipeline.data.folds import label_index
from arena_pipeline.partitions import fold_partitions, run_folds
from arena_pipeline.profile import ModelSpec, Profile
from arena_pipeline.resources.launching import Launcher
from arena_pipeline.resources.storage import ArenaStorage, atomic_write_json, atomic_write_parquet
from arena_pipeline.resources.tracking import MlflowTracking
from gpu_jobs.contract.metrics import log_loss
from gpu_jobs.contract.schema import PROB_COLUMNS, TARGET_COLUMNS, WEIGHT_COLUMN

GROUP = "distillation"
STAGE = "distill_teacher"  # the MLflow stage tag of the nested teacher jobs
TEACHER_COLUMNS = ["teacher_a", "teacher_b", "teacher_tie"]  # the blended teacher probabilities (NaN: none)
TARGETS = list(TARGET_COLUMNS)


def targets_asset_name(student: str) -> str:
    return f"distill_targets_{student}"


def distill_dir(storage: ArenaStorage, student: str) -> Path:
    return storage.root / "distill" / student


def targets_path(storage: ArenaStorage, student: str, fold: int) -> Path:
    """Outer fold K's training rows with teacher probabilities, mixed targets and provenance."""
    return distill_dir(storage, student) / f"targets_fold{fold}.parquet"


def teacher_jobs_file(storage: ArenaStorage, student: str, fold: int) -> Path:
    return targets_path(storage, student, fold).with_suffix(".teachers.json")


def teacher_job_dir(storage: ArenaStorage, student: str, teacher: str, outer: int, inner: int) -> Path:
    """One nested teacher job: trained without outer fold K and inner fold j, predicts fold j."""
    return distill_dir(storage, student) / "teachers" / teacher / f"outer{outer}" / f"fold{inner}"


def mix_targets(teacher: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """alpha * teacher + (1 - alpha) * one-hot(y); rows whose teacher is NaN (no teacher) keep the one-hot."""
    onehot = np.eye(3)[y]
    mixed = alpha * teacher + (1 - alpha) * onehot
    return np.where(np.isnan(teacher).any(axis=1, keepdims=True), onehot, mixed)


def student_training_data(storage: ArenaStorage, processed_folds: Path, student: str, fold: int) -> Path:
    """The student's data file for fold K: the targets rows (train) + fold K's human rows (validation)."""
    path = targets_path(storage, student, fold)
    if not path.exists():
        raise dg.Failure(f"{student}: no distillation targets for fold {fold} at {path}: materialise "
                         f"{targets_asset_name(student)} (partition {fold}) first")
    train = pd.read_parquet(path)
    processed = pd.read_parquet(processed_folds)
    val = processed[processed["fold"] == fold]
    val = val.assign(**dict(zip(TARGETS, np.eye(3)[label_index(val)].T)), **{WEIGHT_COLUMN: 1.0})
    keep = [*processed.columns, *TARGETS, WEIGHT_COLUMN]
    combined = pd.concat([train[keep], val[keep]], ignore_index=True)
    return atomic_write_parquet(combined, storage.scratch("distill") / f"{student}_train_fold{fold}.parquet")


def leakage_report(storage: ArenaStorage, student: str, folds: tuple[int, ...]) -> dict:
    """Per outer fold K: rows whose targets came from a teacher that trained on fold K or on the row's own fold
    (provenance columns), rows of fold K itself, rows whose provenance is not that of a listed teacher job, teacher
    jobs whose ``job.json`` says they trained on fold K or held out another outer fold, and targets not summing to 1. ``passed`` only when every count is 0; folds with
    no targets file yet are listed, not failed (a run may materialise one partition)."""
    report: dict = {"passed": True, "leaky_folds": [], "folds_not_materialised": [], "folds": {}}
    for fold in folds:
        path = targets_path(storage, student, fold)
        if not path.exists():
            report["folds_not_materialised"].append(fold)
            continue
        frame = pd.read_parquet(path)
        trained = frame["teacher_train_folds"].map(lambda f: set(int(x) for x in f))
        has_teacher = frame["teacher"] != ""
        on_outer = int((has_teacher & trained.map(lambda f: fold in f)).sum())
        on_own = int((has_teacher & pd.Series([row in f for row, f in zip(frame["fold"], trained)],
                                              index=frame.index)).sum())
        other_outer = int((frame["teacher_outer_fold"] != fold).sum())
        validation_rows = int((frame["fold"] == fold).sum())
        sums = frame[TARGETS].sum(axis=1).to_numpy()
        bad_sums = int(((np.abs(sums - 1) > 1e-6) | (frame[TARGETS].to_numpy() < 0).any(axis=1)).sum())
        wrong_jobs, job_folds = [], {}
        jobs_file = teacher_jobs_file(storage, student, fold)
        for job in (json.loads(jobs_file.read_text()) if jobs_file.exists() else []):
            record = json.loads((Path(job["job_dir"]) / "job.json").read_text())
            job_folds[(record["model"], int(record["fold"]))] = set(record["train_folds"])
            if (fold in record["train_folds"] or int(record["fold"]) == fold
                    or int(record["outer_fold"]) != fold):
                wrong_jobs.append(f"{record['model']} outer {record['outer_fold']} fold {record['fold']} "
                                  f"trained on {record['train_folds']}")
        # each row's provenance must be that of a listed job of each of its teacher members (none: not checked)
        unmatched = int(sum(any(job_folds.get((member, int(row))) != f for member in name.split("+"))
                            for name, row, f in zip(frame["teacher"], frame["fold"], trained) if name))
        ok = not (on_outer or on_own or other_outer or validation_rows or bad_sums or wrong_jobs or unmatched)
        if not jobs_file.exists():
            ok, wrong_jobs = False, [f"no teacher job list at {jobs_file}"]
        report["folds"][str(fold)] = {
            "rows": len(frame), "rows_with_teacher": int(has_teacher.sum()),
            "rows_teacher_trained_on_outer_fold": on_outer, "rows_teacher_trained_on_own_fold": on_own,
            "rows_from_other_outer_fold": other_outer, "rows_of_validation_fold": validation_rows,
            "rows_not_summing_to_one": bad_sums, "rows_not_matching_a_teacher_job": unmatched,
            "teacher_jobs_trained_on_outer_fold": wrong_jobs, "passed": ok}
        if not ok:
            report["passed"] = False
            report["leaky_folds"].append(fold)
    if not report["folds"]:
        report["passed"] = False  # nothing to check is not a pass
    return report


def build_targets_asset(student: ModelSpec, profile: Profile) -> dg.AssetsDefinition:
    teachers = [profile.model(t) for t in student.distill.teacher]
    alpha = student.distill.alpha

    @dg.asset(
        name=targets_asset_name(student.name),
        group_name=GROUP,
        deps=[oof_asset_name(STAGE1, t.name) for t in teachers],  # lineage; processed_folds is an input
        partitions_def=fold_partitions(profile),
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool="gpu",
        kinds={"parquet", "mlflow"},
        description=f"Soft targets of student '{student.name}' per outer fold K: {alpha} x mean of nested "
                    f"out-of-fold probabilities of {[t.name for t in teachers]} (each trained without fold K) + "
                    f"{1 - alpha:g} x the human one-hot label, with per-row provenance.",
        tags={"stage": STAGE1, "model": student.name},
    )
    def _targets(context: dg.AssetExecutionContext, storage: ArenaStorage, launcher: Launcher,
                 mlflow: MlflowTracking, processed_folds: Path) -> dg.MaterializeResult:
        processed = pd.read_parquet(processed_folds)
        teacher_name = "+".join(t.name for t in teachers)
        per_fold: dict[str, dict] = {}
        for outer in run_folds(context):
            rows = processed[processed["fold"] != outer].reset_index(drop=True)
            data = atomic_write_parquet(rows, storage.scratch("distill") / f"{student.name}_outer{outer}.parquet")
            labelled_folds = sorted(set(rows["fold"]) - {-1})
            probs = np.full((len(rows), 3), np.nan)
            train_folds: list[list[int]] = [[] for _ in range(len(rows))]
            jobs, job_losses = [], {}
            for inner in labelled_folds:
                is_inner = (rows["fold"] == inner).to_numpy()
                inner_train = sorted(int(f) for f in set(rows["fold"]) - {inner})
                blended = np.zeros((int(is_inner.sum()), 3))
                for teacher in teachers:
                    out = teacher_job_dir(storage, student.name, teacher.name, outer, inner)
                    with launched_training(context, launcher, mlflow, STAGE, teacher, inner, data, out,
                                           tags={"outer_fold": str(outer), "student": student.name},
                                           record={"outer_fold": outer, "train_folds": inner_train,
                                                   "student": student.name}) as (run, result, metrics):
                        run.log_result({**metrics, "wall_s_with_launch": result.wall_s},
                                       params=resolved_config(out), history=read_history(out),
                                       artifacts=[out / "model" / "config.yaml", out / "metrics.json"])
                    oof = pd.read_parquet(out / "oof.parquet").set_index("id").loc[rows.loc[is_inner, "id"]]
                    blended += oof[list(PROB_COLUMNS)].to_numpy() / len(teachers)
                    jobs.append({"model": teacher.name, "outer_fold": outer, "fold": inner, "job_dir": str(out)})
                    job_losses[f"{teacher.name}/fold{inner}"] = round(float(metrics["val_log_loss"]), 5)
                probs[is_inner] = blended / blended.sum(axis=1, keepdims=True)
                for i in np.flatnonzero(is_inner):
                    train_folds[i] = inner_train
            y = label_index(rows)
            targets = mix_targets(probs, y, alpha)
            has_teacher = ~np.isnan(probs).any(axis=1)
            frame = rows.assign(
                **dict(zip(TEACHER_COLUMNS, probs.T)), **dict(zip(TARGETS, targets.T)), **{WEIGHT_COLUMN: 1.0},
                teacher=np.where(has_teacher, teacher_name, ""), teacher_outer_fold=outer,
                teacher_train_folds=train_folds, alpha=alpha)
            atomic_write_json(jobs, teacher_jobs_file(storage, student.name, outer))
            atomic_write_parquet(frame, targets_path(storage, student.name, outer))
            per_fold[str(outer)] = {
                "rows": len(frame), "rows_with_teacher": int(has_teacher.sum()),
                "rows_human_only": int((~has_teacher).sum()), "teacher_jobs": len(jobs),
                # the blended teacher's log loss on the rows it predicted (each by a model without that row)
                "teacher_log_loss": round(log_loss(y[has_teacher], probs[has_teacher]), 5),
                "teacher_job_log_loss": job_losses,
            }
            context.log.info(f"{targets_asset_name(student.name)} fold {outer}: {len(frame)} rows, "
                             f"{len(jobs)} teacher jobs, teacher log loss {per_fold[str(outer)]['teacher_log_loss']}")
        metadata: dict = {"folds": dg.MetadataValue.json(per_fold), "alpha": alpha,
                          "teacher": dg.MetadataValue.json([t.name for t in teachers])}
        if len(per_fold) == 1:
            (only,) = per_fold.values()
            metadata.update({k: v for k, v in only.items() if not isinstance(v, dict)})
        return dg.MaterializeResult(metadata=metadata)

    return _targets


def build_distillation_assets(profile: Profile) -> list[dg.AssetsDefinition]:
    return [build_targets_asset(spec, profile) for spec in profile.models if spec.distill]
