"""The Dagster code location: assets, checks, jobs, schedule, sensor and resources for one profile.

The profile comes from ``ARENA_PROFILE``: a shipped name (smoke | demo | full | rehearsal; default demo) or the
path of a user's profile YAML, validated as it loads (``arena_pipeline/profile.py``). Resources read their settings
from the environment so the same definitions run locally or on a cluster:
``ARENA_MLFLOW_URI`` (tracking store), ``ARENA_MLFLOW_ARTIFACTS`` (artifact location),
``ARENA_MLFLOW_UI_URL`` (the MLflow UI for links and inline plot images; `arena-pipeline ui` sets it),
``ARENA_ACCELERATE_CONFIG`` (accelerate config file), ``ARENA_LAUNCHER=k8s`` + ``ARENA_K8S_*`` (Kubernetes pods).
"""

from __future__ import annotations

import os

import dagster as dg

from arena_pipeline.assets.predictor_bundle import build_bundle_asset
from arena_pipeline.assets.completions import build_completion_assets
from arena_pipeline.assets.distillation import build_distillation_assets
from arena_pipeline.assets.ensembles import build_ensemble_assets
from arena_pipeline.assets.evaluation import build_evaluation_asset
from arena_pipeline.assets.processed_folds import build_folds_asset
from arena_pipeline.assets.hpo import build_hpo_assets
from arena_pipeline.assets.oof import STAGE1, STAGE2, build_oof_assets
from arena_pipeline.assets.pseudo_labels import build_pseudo_label_asset
from arena_pipeline.assets.sft import build_sft_asset
from arena_pipeline.assets.raw import build_raw_assets
from arena_pipeline.checks import FOLD_CHECKS, build_distillation_checks, build_pseudo_checks
from arena_pipeline.profile import Profile, get_profile
from arena_pipeline.jobs import build_jobs
from arena_pipeline.resources.k8s_launcher import k8s_resources_from_env
from arena_pipeline.resources.launcher import JobLauncher, default_environments
from arena_pipeline.resources.storage import ArenaStorage
from arena_pipeline.resources.tracking import MlflowTracking
from arena_pipeline.schedules import build_schedules
from arena_pipeline.sensors import build_sensors


def build_resources(profile: Profile) -> dict:
    resources = {
        "storage": ArenaStorage(home=os.environ.get("ARENA_STORAGE_HOME", "")),
        "launcher": JobLauncher(
            accelerate_config=os.environ.get("ARENA_ACCELERATE_CONFIG", str(profile.accelerate_config_path)),
            environments=default_environments(),
        ),
        "mlflow": MlflowTracking(tracking_uri=os.environ.get("ARENA_MLFLOW_URI", ""),
                                 artifact_location=os.environ.get("ARENA_MLFLOW_ARTIFACTS", ""),
                                 ui_url=os.environ.get("ARENA_MLFLOW_UI_URL", "http://127.0.0.1:5000")),
    }
    resources.update(k8s_resources_from_env() or {})  # ARENA_LAUNCHER=k8s: jobs run as pods (deploy/README.md)
    return resources


def build_definitions(profile: Profile) -> dg.Definitions:
    assets = [
        *build_raw_assets(profile),
        build_folds_asset(profile),
        build_sft_asset(profile),
        *build_completion_assets(profile),
        *build_distillation_assets(profile),
        *build_oof_assets(STAGE1, profile),
        *build_hpo_assets(profile),
        *build_ensemble_assets(profile),
        build_pseudo_label_asset(profile),
        *build_oof_assets(STAGE2, profile),
        build_bundle_asset(profile),
        build_evaluation_asset(profile),
    ]
    jobs = build_jobs(profile)
    pseudo_job = next(j for j in jobs if j.name == "pseudo_labels_job")
    return dg.Definitions(
        assets=assets,
        asset_checks=[*FOLD_CHECKS, *build_pseudo_checks(profile), *build_distillation_checks(profile)],
        jobs=jobs,
        schedules=build_schedules(pseudo_job),
        sensors=build_sensors(pseudo_job),
        resources=build_resources(profile),
    )


PROFILE = get_profile()
defs = build_definitions(PROFILE)
