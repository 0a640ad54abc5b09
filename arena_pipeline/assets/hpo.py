"""Hyper-parameter search as assets: ``hpo_<model>`` per neural member, an optuna study of real training jobs.

Each trial is one `gpu_jobs.train` launch on one fold through the launcher (``pool="gpu"``), with the trial's
hyper-parameters as extra ``--set`` overrides on top of the member's own (``oof.job_args``), and one MLflow child
run (``kind=hpo_trial``, the trial number and study as tags, the per-step training loss streamed). The study
lives in optuna's RDB storage, a sqlite file in the instance folder (``<ArenaStorage.root>/hpo/optuna.db``),
so a second materialisation resumes it and adds ``n_trials`` more. The best trial is exposed as metadata and as
``<root>/hpo/<model>/best.json`` (params, overrides, value, resolved config); a member's OOF asset uses it when
its run config says ``use_hpo: true`` (see ``oof.py``), and then records it in its metadata, its MLflow params
and the job's resolved config.

Pruning (``eval_every_steps`` > 0 in the asset's run config): every trial scores its validation fold every N
optimiser steps (``training.eval_every_steps``; a Pipes message per score, charted live in MLflow as
``val_log_loss_at_step``); each score goes to ``trial.report`` and when optuna's ``MedianPruner`` says prune
(the score is worse than the median of earlier trials at that step, once ``prune_startup_trials`` trials have
completed), the asset writes the trial's stop file (``gpu_jobs.train --stop-file``), the job stops after its
current step, and the trial is told PRUNED. The intermediate scoring is a trial setting only: it is not part of
the best overrides an OOF asset takes.
"""

import json
import shutil
from pathlib import Path

import dagster as dg

from arena_pipeline.assets.oof import job_args, read_history, resolved_config
from arena_pipeline.profile import ModelSpec, Profile
from arena_pipeline.resources.launching import Launcher
from arena_pipeline.resources.storage import ArenaStorage, atomic_write_json
from arena_pipeline.resources.tracking import MlflowTracking

HPO_STAGE = "hpo"


def hpo_asset_name(model: str) -> str:
    return f"hpo_{model}"


def suggest(trial, family: str) -> dict[str, object]:
    """The search space of a family: dotted config keys -> values drawn for this trial."""
    params: dict[str, object] = {
        "training.lr": trial.suggest_float("training.lr", 2e-5, 1e-3, log=True),
        "training.head_lr": trial.suggest_float("training.head_lr", 1e-4, 1e-2, log=True),
        "training.weight_decay": trial.suggest_float("training.weight_decay", 0.0, 0.1),
        "training.warmup_steps": trial.suggest_int("training.warmup_steps", 0, 40),
    }
    if family == "llm_classifier":
        params["lora.r"] = trial.suggest_categorical("lora.r", [8, 16, 32, 64])
        params["lora.dropout"] = trial.suggest_float("lora.dropout", 0.0, 0.1)
    return params


def overrides_of(params: dict[str, object]) -> list[str]:
    return [f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}" for key, value in params.items()]


def hpo_dir(storage: ArenaStorage) -> Path:
    path = storage.root / "hpo"
    path.mkdir(parents=True, exist_ok=True)
    return path


def study_storage_url(storage: ArenaStorage) -> str:
    return f"sqlite:///{hpo_dir(storage) / 'optuna.db'}"


def best_config_path(storage: ArenaStorage, model: str) -> Path:
    return storage.root / "hpo" / model / "best.json"


def build_hpo_asset(spec: ModelSpec, profile: Profile) -> dg.AssetsDefinition:
    name = hpo_asset_name(spec.name)
    family = spec.family.name
    deps = []
    if spec.distill:  # a student's trials train on its teacher's soft targets, as its OOF asset does
        from arena_pipeline.assets.distillation import student_training_data, targets_asset_name

        deps.append(targets_asset_name(spec.name))

    class HpoConfig(dg.Config):
        n_trials: int = 3  # trials added by this materialisation (the study keeps the earlier ones)
        fold: int = profile.folds[0]  # the validation fold every trial trains against
        seed: int = profile.seed  # sampler seed (offset by the trials already in the study)
        eval_every_steps: int = 0  # score the validation fold every N steps and prune on it (0: no pruning)
        prune_startup_trials: int = 2  # completed trials before the median pruner may stop one

    @dg.asset(name=name, group_name=HPO_STAGE, pool="gpu", kinds={"optuna", "mlflow"}, deps=deps,
              tags={"model": spec.name},
              description=f"optuna study of '{spec.name}' ({spec.config}): each trial a `gpu_jobs.train` job on one "
                          "fold and an MLflow child run; stored in the instance's sqlite so it resumes; best config "
                          "in metadata and hpo/<model>/best.json (opt-in for the OOF asset: use_hpo).")
    def _hpo(context: dg.AssetExecutionContext, config: HpoConfig, storage: ArenaStorage, launcher: Launcher,
             mlflow: MlflowTracking, processed_folds: Path) -> dg.MaterializeResult:
        import optuna

        study_name = f"{profile.name}/{spec.name}/fold{config.fold}"
        study = optuna.create_study(study_name=study_name, storage=study_storage_url(storage), direction="minimize",
                                    load_if_exists=True,
                                    sampler=optuna.samplers.TPESampler(seed=config.seed + len(study_trials(
                                        study_name, storage))),
                                    pruner=optuna.pruners.MedianPruner(n_startup_trials=config.prune_startup_trials,
                                                                       n_warmup_steps=0))
        scoring = [f"training.eval_every_steps={config.eval_every_steps}"] if config.eval_every_steps > 0 else []
        data = student_training_data(storage, processed_folds, spec.name, config.fold) if spec.distill else processed_folds
        before = len(study.trials)
        for _ in range(config.n_trials):
            trial = study.ask()
            params = suggest(trial, family)
            overrides = overrides_of(params)
            trial.set_user_attr("overrides", overrides)
            out = storage.root / "hpo" / spec.name / f"trial{trial.number}"
            shutil.rmtree(out, ignore_errors=True)
            stop_file = out.with_name(out.name + ".stop")
            stop_file.unlink(missing_ok=True)
            try:
                with mlflow.job_run(context, stage=HPO_STAGE, model=spec.name, fold=config.fold, kind="hpo_trial",
                                    params={"config_file": str(spec.config_path), "overrides": spec.override_items(),
                                            "trial_overrides": overrides},
                                    tags={"optuna_study": study_name, "optuna_trial": str(trial.number)}) as run:
                    on_message = pruning_relay(context, trial, run.on_message, stop_file) if scoring else run.on_message
                    result = launcher.run(context, "gpu_jobs.train",
                                          [*job_args(spec, config.fold, data, out, extra=overrides + scoring),
                                           "--stop-file", str(stop_file)],
                                          extras={"stage": HPO_STAGE, "model": spec.name, "fold": config.fold,
                                                  "trial": trial.number},
                                          on_message=on_message, **spec.launch_options)
                    metrics = json.loads((out / "metrics.json").read_text())
                    resolved = resolved_config(out)
                    run.log_result({**metrics, "wall_s_with_launch": result.wall_s}, params=resolved,
                                   history=read_history(out))
            except BaseException:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            trial.set_user_attr("mlflow_run_id", run.run_id)
            trial.set_user_attr("resolved_config", resolved)
            shutil.rmtree(out / "model", ignore_errors=True)  # the weights of a trial are not kept; its record is
            if stop_file.exists():  # pruned: the job stopped early on the asset's word
                trial.set_user_attr("stopped_early_at_step", metrics.get("stopped_early_at_step"))
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                run.client.set_tag(run.run_id, "optuna_pruned", "true")
                context.log.info(f"{name} trial {trial.number}: pruned at step {metrics.get('stopped_early_at_step')} "
                                 f"({result.wall_s:.0f}s) {overrides}")
                continue
            study.tell(trial, float(metrics["val_log_loss"]))
            context.log.info(f"{name} trial {trial.number}: val_log_loss {metrics['val_log_loss']:.4f} "
                             f"({result.wall_s:.0f}s) {overrides}")
        best = study.best_trial
        finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        best_record = {"study": study_name, "storage": study_storage_url(storage), "model": spec.name,
                       "family": family, "fold": config.fold, "trial": best.number, "val_log_loss": best.value,
                       "params": best.params, "overrides": best.user_attrs["overrides"],
                       "mlflow_run_id": best.user_attrs.get("mlflow_run_id"),
                       "resolved_config": best.user_attrs.get("resolved_config"), "n_trials": len(finished),
                       "dagster_run_id": context.run_id}
        path = atomic_write_json(best_record, best_config_path(storage, spec.name))
        first = finished[0].value if finished else None
        pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
        return dg.MaterializeResult(metadata={
            "study": study_name, "n_trials": len(finished), "n_trials_added": len(study.trials) - before,
            "n_trials_pruned": len(pruned),
            "best_trial": best.number, "best_val_log_loss": float(best.value),
            "first_trial_val_log_loss": float(first) if first is not None else None,
            "best_params": dg.MetadataValue.json(best.params),
            "best_overrides": dg.MetadataValue.json(best.user_attrs["overrides"]),
            "best_config": dg.MetadataValue.path(str(path)), "study_storage": study_storage_url(storage),
            "mlflow_experiment": dg.MetadataValue.url(mlflow.experiment_url()),
        })

    return _hpo


def pruning_relay(context, trial, on_message, stop_file: Path):
    """A job's Pipes messages to MLflow (``on_message``) and its validation scores to ``trial.report``; when the
    study's pruner says prune, the job's stop file is written (the job stops after its current step)."""

    def relay(payload) -> None:
        on_message(payload)
        if not (isinstance(payload, dict) and payload.get("kind") == "val" and payload.get("val_log_loss") is not None):
            return
        trial.report(float(payload["val_log_loss"]), int(payload["step"]))
        if not stop_file.exists() and trial.should_prune():
            stop_file.parent.mkdir(parents=True, exist_ok=True)
            stop_file.touch()
            context.log.info(f"trial {trial.number}: pruned at step {payload['step']} "
                             f"(val_log_loss {payload['val_log_loss']:.4f})")

    return relay


def study_trials(study_name: str, storage: ArenaStorage) -> list:
    """The trials already stored for ``study_name`` (none when the study does not exist yet)."""
    import optuna

    try:
        return optuna.load_study(study_name=study_name, storage=study_storage_url(storage)).trials
    except KeyError:
        return []


def build_hpo_assets(profile: Profile) -> list[dg.AssetsDefinition]:
    """One ``hpo_<model>`` per neural member of the profile (the features member has no search space here)."""
    return [build_hpo_asset(spec, profile) for spec in profile.models if spec.family.neural]


def hpo_overrides(storage: ArenaStorage, model: str) -> tuple[list[str], dict]:
    """The best trial's overrides for ``model`` and its record; a clear error when no study was run."""
    path = best_config_path(storage, model)
    if not path.exists():
        raise dg.Failure(f"use_hpo is set for '{model}' but {path} does not exist: materialise "
                         f"{hpo_asset_name(model)} first (or drop use_hpo)")
    record = json.loads(path.read_text())
    return list(record["overrides"]), record
