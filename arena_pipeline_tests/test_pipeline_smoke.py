"""The whole graph on the smoke profile: raw files -> both stages -> predictor bundle, in one run.

One session-scoped run (`smoke_run` in conftest.py, a few minutes on 2 cores) feeds every assertion below.
"""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from arena_pipeline import blending as ens
from arena_pipeline.assets.pseudo_labels import TARGETS, leakage_report
from arena_pipeline.bundle import score_frame
from arena_pipeline.profile import SMOKE
from arena_pipeline.data.folds import label_index
from arena_pipeline.resources.storage import ArenaStorage

pytestmark = pytest.mark.slow


def test_every_asset_materialised(smoke_run):
    assert smoke_run["result"].success
    expected = {k.to_user_string() for k in smoke_run["defs"].resolve_asset_graph().get_all_asset_keys()} - {"loso_evaluation"}
    # searches (hpo_*) and generator tuning run on demand, not in the full job
    expected = {k for k in expected if not k.startswith("hpo_") and k != "generator_sft"}
    assert smoke_run["materialised"] == expected
    assert "stage2_oof_cross_encoder_minilm" in expected and "predictor_bundle" in expected


def test_all_checks_passed(smoke_run):
    names = {c.check_name: c.passed for c in smoke_run["checks"]}
    assert names == {"folds_groups_disjoint": True, "folds_label_balance": True, "folds_unique_ids": True,
                     "pseudo_labels_no_leakage": True}


def test_soft_labels_sum_to_one_and_no_leak(smoke_run):
    storage = smoke_run["storage"]
    pseudo = pd.read_parquet(storage.pseudo_labels(0))
    assert len(pseudo) > 0
    np.testing.assert_allclose(pseudo[TARGETS].sum(axis=1), 1.0, atol=1e-6)
    assert (pseudo[TARGETS].to_numpy() >= 0).all()
    processed = pd.read_parquet(storage.data("processed_folds"))
    assert not pseudo["group"].isin(set(processed.loc[processed["fold"] == 0, "group"])).any()
    pool = pd.read_parquet(storage.data("unlabelled_pairs"))
    generated = pool[pool["source"] == "generated"]
    assert len(generated) == SMOKE.n_generate_prompts  # one new pair per prompt
    # generated pairs whose prompt is a fold-0 validation prompt are held out of fold 0's pseudo labels
    val_groups = set(processed.loc[processed["fold"] == 0, "group"])
    expected = int((~generated["group"].isin(val_groups)).sum())
    assert (pseudo["source"] == "generated").sum() == expected
    assert len(pseudo) == int((~pool["group"].isin(val_groups)).sum())


def test_leakage_check_fails_on_leaked_input(smoke_run, tmp_path):
    storage = smoke_run["storage"]
    leaked_home = tmp_path / "leaked"
    shutil.copytree(storage.root, leaked_home)
    leaked = ArenaStorage(home=str(leaked_home))
    processed = pd.read_parquet(leaked.data("processed_folds"))
    pseudo = pd.read_parquet(leaked.pseudo_labels(0))
    # rule 2: a pool pair whose prompt sits in fold 0's validation rows
    val_row = processed[processed["fold"] == 0].iloc[0]
    pseudo.loc[0, "group"] = val_row["group"]
    pseudo.to_parquet(leaked.pseudo_labels(0))
    report = leakage_report(leaked, leaked.data("processed_folds"), (0,))
    assert not report["passed"] and report["folds"]["0"]["rows_with_validation_prompt"] == 1
    # rule 1: a teacher that trained on fold 0 (its job held out another fold)
    pseudo.loc[0, "group"] = "no such prompt"
    pseudo.to_parquet(leaked.pseudo_labels(0))
    assert leakage_report(leaked, leaked.data("processed_folds"), (0,))["passed"]
    teachers = json.loads((leaked.pseudo_labels(0).with_suffix(".teachers.json")).read_text())
    job_file = leaked_home / os.path.relpath(teachers[0]["job_dir"], storage.root) / "job.json"
    teachers[0]["job_dir"] = str(job_file.parent)
    (leaked.pseudo_labels(0).with_suffix(".teachers.json")).write_text(json.dumps(teachers))
    job = json.loads(job_file.read_text())
    job["fold"] = 1
    job_file.write_text(json.dumps(job))
    report = leakage_report(leaked, leaked.data("processed_folds"), (0,))
    assert not report["passed"] and report["folds"]["0"]["teachers_trained_on_this_fold"]


def test_fitted_blend_no_worse_than_best_member_in_sample(smoke_run):
    spec = json.loads(smoke_run["storage"].ensemble("final_ensemble").read_text())
    assert spec["fitted_blend_log_loss_in_sample"] <= min(spec["member_log_loss"].values()) + 1e-9
    assert abs(sum(spec["weights"].values()) - 1) < 1e-6 and min(spec["weights"].values()) >= 0
    assert {m["stage"] for m in spec["members"]} == {"stage1", "stage2"}


def test_bundle_reproduces_pipeline_predictions(smoke_run):
    storage = smoke_run["storage"]
    processed = pd.read_parquet(storage.data("processed_folds"))
    oof = pd.read_parquet(storage.ensemble("final_ensemble").with_suffix(".oof.parquet"))
    rows = processed.set_index("id").loc[oof["id"]].reset_index()
    probs = score_frame(storage.bundle_dir, rows)
    np.testing.assert_allclose(probs, oof[["p_a", "p_b", "p_tie"]].to_numpy(), atol=1e-5)
    # and the numbers mean something: the blend's loss on these rows is what the ensemble reported
    spec = json.loads(storage.ensemble("final_ensemble").read_text())
    assert ens.log_loss3(label_index(rows), probs) == pytest.approx(spec["fitted_blend_log_loss_in_sample"], abs=1e-4)
    # rows whose labelling has no tie (ties_possible = false in the scored file) are scored without one
    no_tie = rows.assign(ties_possible=np.arange(len(rows)) % 2 == 0)
    conditioned = score_frame(storage.bundle_dir, no_tie)
    odd = np.arange(len(rows)) % 2 == 1
    np.testing.assert_allclose(conditioned[~odd], probs[~odd], atol=1e-12)
    assert np.all(conditioned[odd, 2] == 0)
    np.testing.assert_allclose(conditioned[odd, 0] / conditioned[odd, 1], probs[odd, 0] / probs[odd, 1], rtol=1e-9)


def test_stage1_metadata_and_mlflow_runs(smoke_run):
    from arena_pipeline.resources.tracking import MlflowTracking

    client = MlflowTracking(tracking_uri=f"sqlite:///{smoke_run['home'] / 'mlflow' / 'mlflow.db'}").client()
    exp = client.get_experiment_by_name("arena-pipeline")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'job'")
    keys = {(r.data.tags["stage"], r.data.tags["model"], r.data.tags["fold"]) for r in runs}
    assert keys == {("stage1", "features", "0"), ("stage1", "cross_encoder_minilm", "0"),
                    ("stage2", "features", "0"), ("stage2", "cross_encoder_minilm", "0")}
    for run in runs:
        assert 0 < run.data.metrics["val_log_loss"] < 3
        assert run.data.tags["dagster_run_id"] == smoke_run["result"].run_id


def test_mlflow_runs_live_with_their_jobs(smoke_run):
    """A real MiniLM training: per-step metrics streamed from the job, the job's own duration, config values as
    params, every run (parents included) ended, parents named after the job and fold range."""
    from arena_pipeline.resources.tracking import MlflowTracking

    client = MlflowTracking(tracking_uri=f"sqlite:///{smoke_run['home'] / 'mlflow' / 'mlflow.db'}").client()
    exp = client.get_experiment_by_name("arena-pipeline")
    this_run = f"tags.dagster_run_id = '{smoke_run['result'].run_id}'"  # other tests add runs to this store
    (run,) = client.search_runs([exp.experiment_id], f"{this_run} and tags.kind = 'job' and tags.stage = 'stage1' "
                                                     "and tags.model = 'cross_encoder_minilm'")
    steps = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(steps) == int(run.data.params["n_steps"]) > 0 and [m.step for m in steps] == sorted({m.step for m in steps})
    assert (run.info.end_time - run.info.start_time) / 1000 >= run.data.metrics["wall_s"]  # the job's duration
    for key in ("fold", "n_steps", "num_processes", "resumed_from_step"):
        assert key in run.data.params and key not in run.data.metrics
    from gpu_jobs.precision import resolve

    assert run.data.params["resolved.precision"] == resolve("auto", "cpu").name  # what the hardware gave
    kinds = {r.data.tags.get("kind") for r in client.search_runs([exp.experiment_id], "")}
    assert {"job", "prediction", "generation", "ensemble", "pipeline"} <= kinds
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    (parent,) = client.search_runs([exp.experiment_id], f"{this_run} and tags.kind = 'pipeline'")
    assert parent.info.run_name.startswith("full_pipeline_job[0...0] ") and parent.info.status == "FINISHED"


def test_bundle_registered_in_mlflow(smoke_run):
    from arena_pipeline.resources.tracking import MlflowTracking

    client = MlflowTracking(tracking_uri=f"sqlite:///{smoke_run['home'] / 'mlflow' / 'mlflow.db'}").client()
    versions = client.search_model_versions("name = 'arena-pipeline-predictor'")
    assert len(versions) == 1
    artifacts = {a.path for a in client.list_artifacts(versions[0].run_id, "bundle")}
    assert "bundle/bundle.json" in artifacts and "bundle/models" in artifacts
