"""The MLflow resource: one run per (stage, model, fold), nested under a parent run per Dagster run."""

import dagster as dg
import pytest

from arena_pipeline.resources.tracking import MlflowTracking, flatten


def test_flatten_config():
    assert flatten("", {"training": {"lr": 1e-4, "mods": ["q", "k"]}, "seed": 1}, {}) == {
        "training.lr": "0.0001", "training.mods": '["q", "k"]', "seed": "1"}


def test_job_runs_nest_under_one_parent_and_carry_tags(tmp_path):
    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["0", "1"]),
              backfill_policy=dg.BackfillPolicy.single_run())
    def oof(context: dg.AssetExecutionContext, mlflow: MlflowTracking) -> None:
        for fold in (0, 1):
            history = [{"step": s, "loss": 1.1 - 0.1 * s, "lr": 1e-4} for s in range(3)]
            mlflow.log_job(context, stage="stage1", model="features", fold=fold,
                           params={"training": {"lr": 1e-4}}, metrics={"val_log_loss": 1.0 - 0.1 * fold},
                           history=history, tags={"data_version": "abc"})

    result = dg.materialize([oof], resources={"mlflow": tracking},
                            tags={"dagster/asset_partition_range_start": "0", "dagster/asset_partition_range_end": "1"})
    assert result.success
    client = tracking.client()
    exp = client.get_experiment_by_name("arena-pipeline")
    jobs = client.search_runs([exp.experiment_id], "tags.kind = 'job'")
    parents = client.search_runs([exp.experiment_id], "tags.kind = 'pipeline'")
    assert len(jobs) == 2 and len(parents) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parents[0].info.run_id}
    run = sorted(jobs, key=lambda r: r.data.tags["fold"])[1]
    assert run.data.tags["dagster_run_id"] == result.run_id
    assert run.data.tags["stage"] == "stage1" and run.data.tags["data_version"] == "abc"
    assert run.data.params["training.lr"] == "0.0001"
    assert run.data.metrics["val_log_loss"] == pytest.approx(0.9)
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == [0, 1, 2]
    assert losses[-1].value == pytest.approx(0.9)


def test_mlflow_key_sanitises_member_names():
    from arena_pipeline.resources.tracking import mlflow_key

    assert mlflow_key("weights.stage1/features+tta") == "weights.stage1/features_tta"
