"""A small MLflow resource: one run per (stage, model, fold) under a parent run per Dagster run.

The store is sqlite under the state folder by default (``tracking_uri`` overrides it). Runs of every family
and stage share param and metric names (``training.lr``, ``val_log_loss``, ...), so MLflow's compare view
lines them up.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import dagster as dg

from arena_pipeline.profile import REPO_ROOT, dagster_home

EXPERIMENT = "arena-pipeline"
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


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
    ui_url: str = "http://127.0.0.1:5000"  # where `arena-pipeline ui` serves MLflow (links, inline plot images)

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
        """The experiment's id (created on first use), marked as a model-training experiment so MLflow 3's UI
        opens it on its runs table instead of the GenAI (traces) pages."""
        client = client or self.client()
        found = client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                exp_id = client.create_experiment(self.experiment, artifact_location=self.artifact_root,
                                                  tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except Exception:  # created concurrently by another run
                found = client.get_experiment_by_name(self.experiment)
            else:
                return exp_id
        if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # an experiment made by an older version
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id

    def experiment_url(self) -> str:
        """The experiment's runs table in the MLflow UI."""
        return f"{self.ui_url}/#/experiments/{self.experiment_id()}/runs"

    def parent_run(self, context) -> str:
        """The MLflow run standing for one Dagster run; (stage, model, fold) runs nest under it."""
        client = self.client()
        exp = self.experiment_id(client)
        hits = client.search_runs(
            [exp], filter_string=f"tags.dagster_run_id = '{context.run_id}' and tags.kind = 'pipeline'", max_results=1
        )
        if hits:
            return hits[0].info.run_id
        title = run_title(context)
        run = client.create_run(
            exp,
            run_name=f"{title} {context.run_id[:8]}",
            tags={"dagster_run_id": context.run_id, "kind": "pipeline", "dagster_job": context.job_name or "adhoc",
                  "dagster_selection": title, "git_commit": git_commit()},
        )
        return run.info.run_id

    @contextlib.contextmanager
    def job_run(self, context, *, stage: str, model: str, fold: int, params: dict | None = None,
                tags: dict[str, str] | None = None, kind: str = "job") -> Iterator["LiveRun"]:
        """An MLflow child run that lives with one job: RUNNING from here, per-step metrics as they arrive
        (``launcher.run(..., on_message=run.on_message)``), FINISHED / FAILED / KILLED (cancelled) at the end,
        so its duration is the job's. The parent run is RUNNING while a child is and ends with it."""
        client = self.client()
        exp = self.experiment_id(client)
        parent = self.parent_run(context)
        all_tags = {
            "mlflow.parentRunId": parent, "kind": kind, "stage": stage, "model": model, "fold": str(fold),
            "dagster_run_id": context.run_id, "asset_key": context.asset_key.to_user_string(),
            "partition": str(fold), "git_commit": git_commit(), **(tags or {}),
        }
        name = f"{stage}/{model}" + (f"/fold{fold}" if fold >= 0 else "")
        run_id = client.create_run(exp, run_name=name, tags=all_tags).info.run_id
        run = LiveRun(client, run_id, self.run_link(exp, run_id), parent)
        client.update_run(parent, status="RUNNING")
        if params:
            run.log_params(params)
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        except (dg.DagsterExecutionInterruptedError, KeyboardInterrupt):
            status = "KILLED"
            raise
        finally:
            client.set_terminated(run.run_id, status)
            # the parent ends with its last child; a later job of the same Dagster run reopens it, and the
            # run_housekeeping_sensor sets its final status from the Dagster run's
            client.set_terminated(parent, "FINISHED" if status == "FINISHED" else status)

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
        """Record a finished (stage, model, fold) job, or with ``kind`` an ensemble fit, in one go; returns
        (run_id, UI link). Jobs that run for a while use :meth:`job_run` instead."""
        with self.job_run(context, stage=stage, model=model, fold=fold, params=params, tags=tags, kind=kind) as run:
            run.log_result(metrics, history=history, artifacts=artifacts)
        return run.run_id, run.link

    def log_pipeline_artifact(self, context: dg.AssetExecutionContext, path: Path) -> dg.MetadataValue:
        """Attach a plot to the parent run of this Dagster run; returns it as inline-image metadata."""
        parent = self.parent_run(context)
        self.client().log_artifact(parent, str(path))
        from arena_pipeline import plots

        return plots.as_metadata(path, self.artifact_url(parent, Path(path).name))

    def register_bundle(self, context: dg.AssetExecutionContext, bundle_dir: Path, metrics: dict[str, float],
                        model_name: str = "arena-pipeline-predictor") -> tuple[str, str]:
        """Log the bundle folder as a run's artifacts and register it as a new version of ``model_name``."""
        client = self.client()
        exp = self.experiment_id(client)
        parent = self.parent_run(context)
        run = client.create_run(exp, run_name="predictor_bundle", tags={
            "mlflow.parentRunId": parent, "kind": "bundle", "dagster_run_id": context.run_id,
            "asset_key": context.asset_key.to_user_string(), "git_commit": git_commit()})
        run_id = run.info.run_id
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
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

    def artifact_url(self, run_id: str, path: str) -> str:
        """The MLflow server's URL of one run artifact (an image the Dagster UI can show inline)."""
        return f"{self.ui_url}/get-artifact?path={quote(path)}&run_uuid={run_id}"


# config values a job reports next to its metrics: MLflow params, not metric series
PARAM_KEYS = ("fold", "num_processes", "resumed_from_step", "n_steps", "family", "name")


class LiveRun:
    """One open MLflow child run (see :meth:`MlflowTracking.job_run`)."""

    def __init__(self, client, run_id: str, link: str, parent: str):
        self.client, self.run_id, self.link, self.parent = client, run_id, link, parent

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        flat = {mlflow_key(k): v[:6000] for k, v in flatten("", params, {}).items()}
        param_list = [Param(k, v) for k, v in flat.items() if k not in existing]
        for start in range(0, len(param_list), 100):
            self.client.log_batch(self.run_id, params=param_list[start:start + 100])

    def on_message(self, payload) -> None:
        """A Pipes custom message from the job: ``{"kind": "step", "step": n, "loss": ..., "lr": ...}`` (charted
        as ``train_*``) or ``{"kind": "val", "step": n, "val_log_loss": ...}`` (charted as ``val_log_loss_at_step``)."""
        if isinstance(payload, dict) and payload.get("kind") == "step":
            self.log_history([payload])
        elif isinstance(payload, dict) and payload.get("kind") == "val" and _is_number(payload.get("val_log_loss")):
            self.client.log_metric(self.run_id, "val_log_loss_at_step", float(payload["val_log_loss"]),
                                   step=int(payload.get("step", 0)))

    def log_history(self, rows: list[dict]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metric_list = []
        for row in rows:
            step = int(row.get("step", 0))
            for key, value in row.items():
                if key not in ("step", "kind", "epoch") and _is_number(value):
                    metric_list.append(Metric(f"train_{key}", float(value), now, step))
        for start in range(0, len(metric_list), 900):
            self.client.log_batch(self.run_id, metrics=metric_list[start:start + 900])

    def log_result(self, metrics: dict, *, params: dict | None = None, history: list[dict] | None = None,
                   artifacts: list[Path] = ()) -> None:
        """Final metrics (config values among them become params), the step history if it was not streamed
        (e.g. a resumed job's earlier steps: logged again with the same values, MLflow keeps one per step),
        and artifacts."""
        from mlflow.entities import Metric

        self.log_params({**(params or {}), **{k: v for k, v in metrics.items() if k in PARAM_KEYS}})
        now = int(time.time() * 1000)
        metric_list = [Metric(mlflow_key(k), float(v), now, 0) for k, v in metrics.items()
                       if k not in PARAM_KEYS and _is_number(v)]
        for start in range(0, len(metric_list), 900):
            self.client.log_batch(self.run_id, metrics=metric_list[start:start + 900])
        if history:
            streamed = {m.step for m in self.client.get_metric_history(self.run_id, "train_loss")}
            self.log_history([row for row in history if int(row.get("step", 0)) not in streamed])
        for path in artifacts:
            if Path(path).exists():
                self.client.log_artifact(self.run_id, str(path))


def run_title(context) -> str:
    """What a Dagster run ran, for MLflow run names: the job, or for an ad-hoc materialisation (the hidden
    ``__ASSET_JOB``) the selected assets; plus the partition or partition range."""
    job = context.job_name or "adhoc"
    run = getattr(context, "run", None)
    if job.startswith("__") or job == "adhoc":  # __ASSET_JOB (UI materialise), __ephemeral_asset_job__
        keys = sorted(k.to_user_string() for k in (getattr(run, "asset_selection", None) or []))
        if not keys:
            keys = [context.asset_key.to_user_string()] if getattr(context, "has_assets_def", True) else []
        job = "+".join(keys[:2]) + (f"+{len(keys) - 2} more" if len(keys) > 2 else "") or "adhoc"
    tags = getattr(run, "tags", None) or {}
    if "dagster/partition" in tags:
        job += f"[{tags['dagster/partition']}]"
    elif "dagster/asset_partition_range_start" in tags:
        job += f"[{tags['dagster/asset_partition_range_start']}...{tags.get('dagster/asset_partition_range_end', '')}]"
    return job


def mlflow_key(name: str) -> str:
    """MLflow names allow alphanumerics and _ - . space : / only (``stage1/x+tta`` -> ``stage1/x_tta``)."""
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", name)[:250]


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool) and value == value  # drop NaN
