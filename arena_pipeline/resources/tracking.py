"""A small MLflow resource: one run per (stage, model, fold) under a parent run per Dagster run.

The store is sqlite under the state folder by default (``tracking_uri`` overrides it). Runs of every family
and stage share param and metric names (``training.lr``, ``val_log_loss``, ...), so MLflow's compare view
lines them up.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import dagster as dg

from arena_pipeline.config import REPO_ROOT, dagster_home

EXPERIMENT = "arena-pipeline"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    """``{"training": {"lr": 1e-4}}`` -> ``{"training.lr": "0.0001"}`` (MLflow params are flat strings)."""
    if isinstance(value, dict):
        for key, sub in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


class MlflowTracking(dg.ConfigurableResource):
    tracking_uri: str = ""
    artifact_location: str = ""  # default: <state>/mlflow/artifacts
    experiment: str = EXPERIMENT
    ui_url: str = "http://127.0.0.1:5000"

    @property
    def uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        folder = dagster_home() / "mlflow"
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        return self.artifact_location or (dagster_home() / "mlflow" / "artifacts").as_uri()

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def experiment_id(self, client=None) -> str:
        client = client or self.client()
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(self.experiment, artifact_location=self.artifact_root)
        except Exception:  # created concurrently by another run
            return client.get_experiment_by_name(self.experiment).experiment_id

    def parent_run(self, dagster_run_id: str, job_name: str) -> str:
        """The MLflow run standing for one Dagster run; (stage, model, fold) runs nest under it."""
        client = self.client()
        exp = self.experiment_id(client)
        hits = client.search_runs(
            [exp], filter_string=f"tags.dagster_run_id = '{dagster_run_id}' and tags.kind = 'pipeline'", max_results=1
        )
        if hits:
            return hits[0].info.run_id
        run = client.create_run(
            exp,
            run_name=f"{job_name}-{dagster_run_id[:8]}",
            tags={"dagster_run_id": dagster_run_id, "kind": "pipeline", "dagster_job": job_name,
                  "git_commit": git_commit()},
        )
        return run.info.run_id

    def log_job(
        self,
        context: dg.AssetExecutionContext,
        *,
        stage: str,
        model: str,
        fold: int,
        params: dict,
        metrics: dict[str, float],
        history: list[dict] | None = None,
        artifacts: list[Path] = (),
        tags: dict[str, str] | None = None,
        kind: str = "job",
    ) -> tuple[str, str]:
        """Record one (stage, model, fold) job (or, with ``kind``, an ensemble fit); returns (run_id, UI link)."""
        from mlflow.entities import Metric, Param, RunTag

        client = self.client()
        exp = self.experiment_id(client)
        parent = self.parent_run(context.run_id, context.job_name or "adhoc")
        all_tags = {
            "mlflow.parentRunId": parent,
            "kind": kind,
            "stage": stage,
            "model": model,
            "fold": str(fold),
            "dagster_run_id": context.run_id,
            "asset_key": context.asset_key.to_user_string(),
            "partition": str(fold),
            "git_commit": git_commit(),
            **(tags or {}),
        }
        run = client.create_run(exp, run_name=f"{stage}/{model}/fold{fold}", tags=all_tags)
        run_id = run.info.run_id
        flat = flatten("", params, {})
        param_list = [Param(mlflow_key(k), v[:6000]) for k, v in flat.items()]
        for start in range(0, len(param_list), 100):
            client.log_batch(run_id, params=param_list[start:start + 100])
        now = int(__import__("time").time() * 1000)
        metric_list = [Metric(mlflow_key(k), float(v), now, 0) for k, v in metrics.items() if _is_number(v)]
        for row in history or []:
            step = int(row.get("step", 0))
            for key, value in row.items():
                if key != "step" and _is_number(value):
                    name = f"train_{key}" if key in ("loss", "lr") else mlflow_key(key)
                    metric_list.append(Metric(name, float(value), now, step))
        for start in range(0, len(metric_list), 900):
            client.log_batch(run_id, metrics=metric_list[start:start + 900])
        for path in artifacts:
            if Path(path).exists():
                client.log_artifact(run_id, str(path))
        client.set_terminated(run_id)
        return run_id, self.run_link(exp, run_id)

    def log_pipeline_artifact(self, context: dg.AssetExecutionContext, path: Path) -> None:
        """Attach a file (e.g. a data plot) to the parent run of this Dagster run."""
        self.client().log_artifact(self.parent_run(context.run_id, context.job_name or "adhoc"), str(path))

    def register_bundle(self, context: dg.AssetExecutionContext, bundle_dir: Path, metrics: dict[str, float],
                        model_name: str = "arena-pipeline-predictor") -> tuple[str, str]:
        """Log the bundle folder as a run's artifacts and register it as a new version of ``model_name``."""
        client = self.client()
        exp = self.experiment_id(client)
        parent = self.parent_run(context.run_id, context.job_name or "adhoc")
        run = client.create_run(exp, run_name="predictor_bundle", tags={
            "mlflow.parentRunId": parent, "kind": "bundle", "dagster_run_id": context.run_id,
            "asset_key": context.asset_key.to_user_string(), "git_commit": git_commit()})
        run_id = run.info.run_id
        from mlflow.entities import Metric

        now = int(__import__("time").time() * 1000)
        client.log_batch(run_id, metrics=[Metric(mlflow_key(k), float(v), now, 0) for k, v in metrics.items()
                                          if _is_number(v)])
        client.log_artifacts(run_id, str(bundle_dir), artifact_path="bundle")
        client.set_terminated(run_id)
        try:
            client.create_registered_model(model_name)
        except Exception:  # already registered
            pass
        source = f"{client.get_run(run_id).info.artifact_uri}/bundle"
        version = client.create_model_version(model_name, source=source, run_id=run_id,
                                              tags={"dagster_run_id": context.run_id})
        return version.version, self.run_link(exp, run_id)

    def run_link(self, experiment_id: str, run_id: str) -> str:
        return f"{self.ui_url}/#/experiments/{experiment_id}/runs/{run_id}"


def mlflow_key(name: str) -> str:
    """MLflow names allow alphanumerics and _ - . space : / only (``stage1/x+tta`` -> ``stage1/x_tta``)."""
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", name)[:250]


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool) and value == value  # drop NaN
