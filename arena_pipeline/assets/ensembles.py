"""Ensembles over out-of-fold predictions: non-negative weights (Powell, or optuna) and one temperature.

The TTA output of a model (A/B swapped, permuted back) is a member of its own. The fitted blend's loss is
reported twice: in sample (weights fitted and scored on the same OOF rows) and cross-validated (fitted on
K-1 parts of the OOF rows, scored on the held-out part) — the honest figure.
"""


from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from arena_pipeline import blending as ens
from arena_pipeline import plots
from arena_pipeline.assets.oof import STAGE1, STAGE2, oof_asset_name
from arena_pipeline.profile import Profile
from arena_pipeline.data.folds import label_index
from arena_pipeline.resources.storage import ArenaStorage, atomic_write_json, atomic_write_parquet
from arena_pipeline.resources.tracking import MlflowTracking
from gpu_jobs.contract.schema import PROB_COLUMNS

PROBS = list(PROB_COLUMNS)


@dataclass(frozen=True)
class Member:
    """One ensemble member: a (stage, model) and whether it is the A/B-swapped TTA output."""

    stage: str
    model: str
    tta: bool

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.model}" + ("+tta" if self.tta else "")

    def oof_file(self, storage: ArenaStorage, fold: int) -> Path:
        return storage.job_dir(self.stage, self.model, fold) / ("oof_tta.parquet" if self.tta else "oof.parquet")


def collect_members(storage: ArenaStorage, profile: Profile, stages: tuple[str, ...]) -> dict[Member, pd.DataFrame]:
    """OOF predictions of every member over the profile's folds, indexed by row id."""
    members: dict[Member, pd.DataFrame] = {}
    for stage in stages:
        specs = profile.models if stage == STAGE1 else profile.stage2_models
        for spec in specs:
            for tta in (False, True):
                member = Member(stage, spec.name, tta)
                files = [member.oof_file(storage, fold) for fold in profile.folds]
                if tta and not all(f.exists() for f in files):
                    continue
                missing = [str(f) for f in files if not f.exists()]
                if missing:
                    raise dg.Failure(f"member {member.name} has no OOF predictions at {missing}: materialise "
                                     f"{oof_asset_name(stage, spec.name)} for folds {list(profile.folds)} first")
                frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
                members[member] = frame.set_index("id")[PROBS]
    return members


def fit_ensemble(storage: ArenaStorage, processed_folds: Path, profile: Profile, stages: tuple[str, ...], name: str,
                 method: str) -> tuple[dict, dict[str, Path]]:
    """Fit weights + temperature on the OOF rows all members share; write the spec and blended OOF."""
    members = collect_members(storage, profile, stages)
    ids = sorted(set.intersection(*(set(frame.index) for frame in members.values())))
    processed = pd.read_parquet(processed_folds).set_index("id")
    y = label_index(processed.loc[ids].reset_index())
    probs = {m.name: frame.loc[ids].to_numpy() for m, frame in members.items()}
    weights = ens.fit_weights(probs, y, method=method, seed=profile.seed)
    blended = ens.blend(probs, weights)
    temperature = ens.fit_temperature(blended, y, lower=profile.min_temperature)
    final = ens.apply_temperature(blended, temperature)
    cv = ens.cross_validated_blend(probs, y, seed=profile.seed, method=method, min_temperature=profile.min_temperature)
    member_loss = {n: ens.log_loss3(y, p) for n, p in probs.items()}
    prior = np.bincount(y, minlength=3) / len(y)
    summary = {
        "members": [{"name": m.name, "stage": m.stage, "model": m.model, "tta": m.tta} for m in members],
        "weights": weights,
        "temperature": float(temperature),
        "folds": list(profile.folds),
        "n_rows": len(ids),
        "member_log_loss": member_loss,
        "uniform_blend_log_loss": ens.log_loss3(y, ens.blend(probs, {n: 1.0 / len(probs) for n in probs})),
        "fitted_blend_log_loss_in_sample": ens.log_loss3(y, final),
        "fitted_blend_log_loss_cv": float(cv["cv_log_loss"]),
        "fitted_blend_accuracy": ens.accuracy(y, final),
        "per_class_loss": ens.per_class_loss(y, final),
        "class_prior_log_loss": ens.log_loss3(y, np.tile(prior, (len(y), 1))),
        # the tie rate the tempered blend assumes (its mean tie on these rows): EM prior adaptation starts from it
        "oof_mean_tie": float(final[:, 2].mean()),
        "method": method,
    }
    atomic_write_json(summary, storage.ensemble(name))
    atomic_write_parquet(pd.DataFrame({"id": ids, **{c: final[:, i] for i, c in enumerate(PROBS)}}),
                         storage.ensemble(name).with_suffix(".oof.parquet"))
    folder = storage.scratch("plots")
    pngs = {
        "weights_chart": plots.bar_chart(weights, folder / f"{name}_weights.png", f"{name}: member weights", "weight"),
        "member_loss_chart": plots.bar_chart(
            {**member_loss, "uniform blend": summary["uniform_blend_log_loss"],
             "fitted blend (cv)": summary["fitted_blend_log_loss_cv"]},
            folder / f"{name}_losses.png", f"{name}: OOF log loss", "log loss"),
        "reliability": plots.reliability_diagram(y, final, folder / f"{name}_reliability.png", f"{name} reliability"),
        "confusion_matrix": plots.confusion_matrix(y, final, folder / f"{name}_confusion.png", name),
    }
    return summary, pngs


def log_ensemble(context, mlflow: MlflowTracking, name: str, summary: dict, pngs: dict[str, Path],
                 path: Path) -> dict:
    """MLflow run of the ensemble fit (weights as params, losses as metrics, the plots) + Dagster metadata."""
    metrics = {k: summary[k] for k in ("temperature", "uniform_blend_log_loss", "fitted_blend_log_loss_in_sample",
                                        "fitted_blend_log_loss_cv", "fitted_blend_accuracy", "class_prior_log_loss")}
    metrics.update({f"member_log_loss.{k}": v for k, v in summary["member_log_loss"].items()})
    run_id, link = mlflow.log_job(context, stage=name, model="ensemble", fold=-1, kind="ensemble",
                                  params={"method": summary["method"], "weights": summary["weights"],
                                          "folds": summary["folds"]},
                                  metrics=metrics, artifacts=[path, *pngs.values()])
    images = {k: plots.as_metadata(p, mlflow.artifact_url(run_id, p.name)) for k, p in pngs.items()}
    return {**_metadata(summary, images, path), "mlflow_run": dg.MetadataValue.url(link)}


def _metadata(summary: dict, images: dict, path: Path) -> dict:
    scalars = {k: float(summary[k]) for k in ("temperature", "uniform_blend_log_loss", "fitted_blend_log_loss_in_sample",
                                             "fitted_blend_log_loss_cv", "fitted_blend_accuracy",
                                             "class_prior_log_loss")}
    return {
        **scalars,
        "rows": summary["n_rows"],
        "weights": dg.MetadataValue.json(summary["weights"]),
        "member_log_loss": dg.MetadataValue.json(summary["member_log_loss"]),
        "best_member_log_loss": float(min(summary["member_log_loss"].values())),
        "per_class_loss": dg.MetadataValue.json(summary["per_class_loss"]),
        "path": dg.MetadataValue.path(str(path)),
        **images,
    }


class EnsembleConfig(dg.Config):
    method: str = "powell"  # or "optuna"


def build_ensemble_assets(profile: Profile) -> list[dg.AssetsDefinition]:
    stage1_deps = [oof_asset_name(STAGE1, m.name) for m in profile.models]
    stage2_deps = [oof_asset_name(STAGE2, m.name) for m in profile.stage2_models]

    @dg.asset(group_name="ensembles", deps=stage1_deps, kinds={"scipy"},
              description="Stage-1 blend: member weights + temperature fitted on out-of-fold predictions.")
    def stage1_ensemble(context: dg.AssetExecutionContext, config: EnsembleConfig, storage: ArenaStorage,
                        mlflow: MlflowTracking, processed_folds: Path):
        summary, pngs = fit_ensemble(storage, processed_folds, profile, (STAGE1,), "stage1_ensemble", config.method)
        context.log.info(f"stage1 blend: cv {summary['fitted_blend_log_loss_cv']:.4f}, weights {summary['weights']}")
        return dg.MaterializeResult(metadata=log_ensemble(context, mlflow, "stage1_ensemble", summary, pngs,
                                                          storage.ensemble("stage1_ensemble")))

    @dg.asset(group_name="ensembles", deps=stage1_deps + stage2_deps, kinds={"scipy"},
              description="Final blend over stage-1 and stage-2 members (OOF on the same human-labelled rows).")
    def final_ensemble(context: dg.AssetExecutionContext, config: EnsembleConfig, storage: ArenaStorage,
                       mlflow: MlflowTracking, processed_folds: Path):
        summary, pngs = fit_ensemble(storage, processed_folds, profile, (STAGE1, STAGE2), "final_ensemble", config.method)
        context.log.info(f"final blend: cv {summary['fitted_blend_log_loss_cv']:.4f}, weights {summary['weights']}")
        return dg.MaterializeResult(metadata=log_ensemble(context, mlflow, "final_ensemble", summary, pngs,
                                                          storage.ensemble("final_ensemble")))

    return [stage1_ensemble, final_ensemble]
