"""The Dagster code location: assets, checks, jobs, schedule, sensor and resources for one profile.

The profile comes from ``ARENA_PROFILE``: a shipped name (smoke | demo | full | rehearsal; default demo) or the
path of a user's profile YAML, validated as it loads (``arena_pipeline/profile.py``). Resources read their settings
from the environment so the same definitions run locally or on a cluster:
``ARENA_MLFLOW_URI`` (tracking store), ``ARENA_MLFLOW_ARTIFACTS`` (artifact location),
``ARENA_MLFLOW_UI_URL`` (the MLflow UI for links and inline plot images; `arena-pipeline ui` sets it),
``ARENA_ACCELERATE_CONFIG`` (accelerate config file), ``ARENA_LAUNCHER=k8s`` + ``ARENA_K8S_*`` (Kubernetes pods:
the launcher's config fields, set with ``dg.EnvVar`` so a bad value fails when the resource starts, naming the
variable; deploy/README.md lists them).
"""

from __future__ import annotations

import json
import os

from typing import Callable

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
from arena_pipeline.profile import REPO_ROOT, Profile, get_profile
from arena_pipeline.jobs import build_jobs
from arena_pipeline.resources.asset_files import AssetFiles
from arena_pipeline.resources.k8s_launcher import K8sJobLauncher
from arena_pipeline.resources.k8s_manifests import DEFAULT_STATE_PATH, check_state_mount
from arena_pipeline.resources.launcher import JobLauncher, default_environments
from arena_pipeline.resources.launching import Launcher
from arena_pipeline.resources.storage import ArenaStorage
from arena_pipeline.resources.tracking import MlflowTracking
from arena_pipeline.schedules import build_schedules
from arena_pipeline.sensors import build_sensors


# K8sJobLauncher fields set from one ARENA_K8S_* variable each, when it is set (else the field's default)
K8S_ENV_STR = {
    "namespace": "ARENA_K8S_NAMESPACE", "accelerate_config": "ARENA_K8S_ACCELERATE_CONFIG",
    "cpu_request": "ARENA_K8S_CPU", "memory_request": "ARENA_K8S_MEMORY", "cpu_limit": "ARENA_K8S_CPU_LIMIT",
    "memory_limit": "ARENA_K8S_MEMORY_LIMIT", "shm_size": "ARENA_K8S_SHM_SIZE",
    "service_account": "ARENA_K8S_SERVICE_ACCOUNT", "image_pull_policy": "ARENA_K8S_IMAGE_PULL_POLICY",
    "working_dir": "ARENA_K8S_WORKDIR", "python": "ARENA_K8S_PYTHON", "state_pvc": "ARENA_K8S_PVC",
    "state_mount_path": "ARENA_K8S_STATE_PATH",
}
K8S_ENV_INT = {"gpus": "ARENA_K8S_GPUS", "num_machines": "ARENA_K8S_NUM_MACHINES"}


def _env_structured(name: str, kind: type, values: Callable = str):
    """A dict (JSON object or ``k=v,k2=v2``) or list (JSON list of objects, or ``a,b``) setting from the environment.
    dg.EnvVar carries strings and numbers only, so these few are read here, at load time."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return kind()
    if raw[0] in "[{":
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not valid JSON ({exc}): {raw!r}") from None
    elif kind is dict:
        items = [item.partition("=") for item in filter(None, (part.strip() for part in raw.split(",")))]
        if any(not sep or not key.strip() for key, sep, _ in items):
            raise ValueError(f"{name} must be JSON or 'key=value,key2=value2', got {raw!r}")
        parsed = {key.strip(): value.strip() for key, _, value in items}
    else:
        parsed = [part.strip() for part in raw.split(",") if part.strip()]
    if not isinstance(parsed, kind):
        raise ValueError(f"{name} must be a JSON {'object' if kind is dict else 'list'}, got {raw!r}")
    try:
        return {str(k): values(v) for k, v in parsed.items()} if kind is dict else [values(v) for v in parsed]
    except (TypeError, ValueError):
        raise ValueError(f"{name} has a value that is not {values.__name__}: {raw!r}") from None


def k8s_launcher() -> K8sJobLauncher:
    """The Kubernetes launcher with its settings from ``ARENA_K8S_*`` (deploy/README.md): strings and numbers as
    ``dg.EnvVar`` (resolved when the resource starts; an unset ARENA_K8S_IMAGE or a non-integer ARENA_K8S_GPUS fails
    there, naming the variable), the structured ones parsed here."""
    images = _env_structured("ARENA_K8S_IMAGES", dict)
    if os.environ.get("ARENA_K8S_IMAGE") or "default" not in images:  # unset: the resource's start names it
        images["default"] = dg.EnvVar("ARENA_K8S_IMAGE")
    if os.environ.get("ARENA_K8S_IMAGE_GENERATION"):
        images["generation"] = dg.EnvVar("ARENA_K8S_IMAGE_GENERATION")
    settings: dict = {field: dg.EnvVar(name) for field, name in K8S_ENV_STR.items() if os.environ.get(name)}
    settings.update({field: dg.EnvVar.int(name) for field, name in K8S_ENV_INT.items() if os.environ.get(name)})
    structured = {"node_selector": ("ARENA_K8S_NODE_SELECTOR", dict, str), "env_vars": ("ARENA_K8S_ENV", dict, str),
                  "environment_gpus": ("ARENA_K8S_ENVIRONMENT_GPUS", dict, int),
                  "env_secrets": ("ARENA_K8S_ENV_SECRETS", list, str),
                  "image_pull_secrets": ("ARENA_K8S_IMAGE_PULL_SECRETS", list, str),
                  "tolerations": ("ARENA_K8S_TOLERATIONS", list, dict), "volumes": ("ARENA_K8S_VOLUMES", list, dict),
                  "volume_mounts": ("ARENA_K8S_VOLUME_MOUNTS", list, dict)}
    settings.update({field: _env_structured(name, kind, values) for field, (name, kind, values) in structured.items()
                     if os.environ.get(name, "").strip()})
    pvc = os.environ.get("ARENA_K8S_PVC")
    if pvc:  # the job pods must see the files at the paths the storage resource hands them: checked at load time
        check_state_mount(pvc, os.environ.get("ARENA_K8S_STATE_PATH") or DEFAULT_STATE_PATH,
                          os.environ.get("ARENA_STORAGE_HOME")  # else ArenaStorage's default root
                          or os.path.join(os.environ.get("DAGSTER_HOME") or str(REPO_ROOT / ".dagster_home"), "arena"))
    keep = os.environ.get("ARENA_K8S_KEEP_PODS", "").strip().lower() in ("1", "true", "yes")
    return K8sJobLauncher(images=images, delete_pods=not keep, **settings)


def build_launcher(profile: Profile) -> Launcher:
    """``ARENA_LAUNCHER``: ``local`` (default; subprocesses) or ``k8s`` (pods; deploy/README.md)."""
    choice = os.environ.get("ARENA_LAUNCHER", "").strip().lower()
    if choice == "k8s":
        return k8s_launcher()
    if choice not in ("", "local", "subprocess"):
        raise ValueError(f"ARENA_LAUNCHER must be 'local' or 'k8s', got {choice!r}")
    return JobLauncher(accelerate_config=os.environ.get("ARENA_ACCELERATE_CONFIG", str(profile.accelerate_config_path)),
                       environments=default_environments())


def build_resources(profile: Profile) -> dict:
    storage = ArenaStorage(home=os.environ.get("ARENA_STORAGE_HOME", ""))
    return {
        "storage": storage,
        "io_manager": AssetFiles(storage=storage),  # an asset's parameter named after an upstream asset = its file
        "launcher": build_launcher(profile),
        "mlflow": MlflowTracking(tracking_uri=os.environ.get("ARENA_MLFLOW_URI", ""),
                                 artifact_location=os.environ.get("ARENA_MLFLOW_ARTIFACTS", ""),
                                 ui_url=os.environ.get("ARENA_MLFLOW_UI_URL", "http://127.0.0.1:5000")),
    }


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
