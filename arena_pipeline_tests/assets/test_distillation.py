"""Distillation (assets/distillation.py): a student's profile entry, the nested teacher targets and their
provenance, the blocking leak check (passes on the real asset, fails on leaky files), the student's OOF.

The pipeline test materialises the test-local profile `profiles/distill_smoke.yaml` (240 labelled rows, 3
folds, fold 0): 2 nested `features` teacher jobs and the `features` student, real launches through the launcher
(about a minute on 2 loaded cores).
"""

import json
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml

from arena_pipeline.assets import distillation as D
from arena_pipeline.assets.oof import STAGE1, oof_asset_name
from arena_pipeline.data.folds import label_index
from arena_pipeline.profile import load_profile
from arena_pipeline.resources.asset_files import AssetFiles
from arena_pipeline.resources.launcher import JobLauncher
from arena_pipeline.resources.storage import ArenaStorage
from arena_pipeline.resources.tracking import MlflowTracking
from gpu_jobs.contract.metrics import log_loss
from gpu_jobs.contract.schema import PROB_COLUMNS

PROFILE_FILE = Path(__file__).parent / "profiles" / "distill_smoke.yaml"
STUDENT, TEACHER = "features_student", "features"


def write_profile(tmp_path, **student_entry) -> Path:
    data = yaml.safe_load(PROFILE_FILE.read_text())
    data["models"][1] = {"name": STUDENT, "config": "features.yaml", **student_entry}
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------------ the profile entry
def test_profile_declares_a_student_with_resolved_teacher():
    profile = load_profile(PROFILE_FILE)
    student = profile.model(STUDENT)
    assert student.distill.teacher == (TEACHER,) and student.distill.alpha == 0.5
    assert profile.model(TEACHER).distill is None


def test_default_teacher_is_every_member_that_is_not_a_student(tmp_path):
    data = yaml.safe_load(PROFILE_FILE.read_text())
    data["models"] = [data["models"][0], {"name": "features_hgb", "config": "features_hgb.yaml"},
                      {"name": STUDENT, "config": "features.yaml", "distill": {"alpha": 0.3}},
                      {"name": "student2", "config": "features.yaml", "distill": {}}]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    profile = load_profile(path)
    assert profile.model(STUDENT).distill.teacher == ("features", "features_hgb")
    assert profile.model(STUDENT).distill.alpha == 0.3
    assert profile.model("student2").distill.teacher == ("features", "features_hgb")


@pytest.mark.parametrize("entry, message", [
    ({"teacher": ["no_such_member"]}, "key 'models.features_student.distill.teacher': unknown member 'no_such_member'"),
    ({"teacher": [STUDENT]}, "is a student itself"),
    ({"teacher": [TEACHER], "alpha": 1.5}, "key 'models[1].distill.alpha'"),
    ({"teacher": [TEACHER], "temperature": 2}, "key 'models[1].distill.temperature'"),
])
def test_bad_student_entries_fail_naming_file_and_key(tmp_path, entry, message):
    path = write_profile(tmp_path, distill=entry)
    with pytest.raises(ValueError) as err:
        load_profile(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_graph_lineage_teacher_targets_student_and_blocking_check():
    from arena_pipeline.definitions import build_definitions

    defs = build_definitions(load_profile(PROFILE_FILE))
    graph = defs.resolve_asset_graph()
    targets = dg.AssetKey(D.targets_asset_name(STUDENT))
    assert graph.get(targets).parent_keys == {dg.AssetKey("processed_folds"), dg.AssetKey(oof_asset_name(STAGE1, TEACHER))}
    assert targets in graph.get(dg.AssetKey(oof_asset_name(STAGE1, STUDENT))).parent_keys
    assert dg.AssetKey(oof_asset_name(STAGE1, TEACHER)) not in graph.get(dg.AssetKey(oof_asset_name(STAGE1, STUDENT))).parent_keys
    (check,) = [c for c in graph.asset_check_keys if c.asset_key == targets]
    assert check.name == "distill_targets_no_leakage"
    stage1_job = {k.to_user_string() for k in defs.resolve_job_def("stage1_job").asset_layer.executable_asset_keys}
    assert stage1_job == {"stage1_oof_features", "stage1_oof_features_student", "stage1_ensemble", targets.path[0]}
    # a plain member's OOF and the shipped profiles have no distillation assets
    smoke = build_definitions(load_profile("smoke")).resolve_asset_graph()
    assert not [k for k in smoke.get_all_asset_keys() if k.to_user_string().startswith("distill_")]


def test_mix_targets_numbers():
    teacher = np.array([[0.6, 0.3, 0.1], [np.nan, np.nan, np.nan]])
    mixed = D.mix_targets(teacher, np.array([1, 2]), 0.25)
    np.testing.assert_allclose(mixed, [[0.15, 0.825, 0.025], [0, 0, 1]])


# ------------------------------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    from arena_pipeline.checks import build_distillation_checks
    from arena_pipeline.definitions import build_definitions

    home = tmp_path_factory.mktemp("distill")
    profile = load_profile(PROFILE_FILE)
    storage = ArenaStorage(home=str(home / "arena"))
    mlflow = MlflowTracking(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    defs = build_definitions(profile)
    assets = list(defs.assets)
    # the teacher's own stage-1 OOF is upstream for lineage only (the nested jobs are the teacher's data): left out
    selection = ["raw_labelled", "raw_external", "processed_folds", D.targets_asset_name(STUDENT),
                 oof_asset_name(STAGE1, STUDENT)]
    result = dg.materialize([*assets, *build_distillation_checks(profile)], selection=selection, partition_key="0",
                            resources={"storage": storage, "io_manager": AssetFiles(storage=storage), "mlflow": mlflow,
                                       "launcher": JobLauncher()},
                            raise_on_error=False)
    return {"result": result, "profile": profile, "storage": storage, "mlflow": mlflow, "assets": assets}


pipeline = pytest.mark.slow  # real `gpu_jobs.train` launches: 3 features jobs, ~12 s each with the launch


@pipeline
def test_targets_one_row_per_training_row_mixed_as_declared(distilled):
    assert distilled["result"].success
    storage, alpha = distilled["storage"], distilled["profile"].model(STUDENT).distill.alpha
    processed = pd.read_parquet(storage.data("processed_folds"))
    targets = pd.read_parquet(D.targets_path(storage, STUDENT, 0))
    training = processed[processed["fold"] != 0]
    assert len(targets) == len(training) and sorted(targets["id"]) == sorted(training["id"])
    assert (processed["fold"] == -1).sum() > 0 and set(processed["fold"]) == {-1, 0, 1, 2}
    soft = targets[D.TARGETS].to_numpy()
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-9)
    onehot = np.eye(3)[label_index(targets)]
    teacher = targets[D.TEACHER_COLUMNS].to_numpy()
    labelled = targets["fold"].to_numpy() >= 0
    np.testing.assert_allclose(soft[labelled], alpha * teacher[labelled] + (1 - alpha) * onehot[labelled], atol=1e-12)
    np.testing.assert_allclose(teacher[labelled].sum(axis=1), 1.0, atol=1e-9)
    # external rows: every teacher trained on them, so no teacher target: the human label alone
    assert np.isnan(teacher[~labelled]).all() and (targets.loc[~labelled, "teacher"] == "").all()
    np.testing.assert_array_equal(soft[~labelled], onehot[~labelled])
    # soft targets really are soft: the teacher is not a copy of the label
    assert np.abs(soft[labelled] - onehot[labelled]).max() > 0.1


@pipeline
def test_nested_teacher_never_trained_on_the_outer_fold(distilled):
    storage = distilled["storage"]
    processed = pd.read_parquet(storage.data("processed_folds"))
    targets = pd.read_parquet(D.targets_path(storage, STUDENT, 0))
    for fold, rows in targets[targets["fold"] >= 0].groupby("fold"):
        assert (rows["teacher"] == TEACHER).all() and (rows["teacher_outer_fold"] == 0).all()
        expected = sorted({-1, 0, 1, 2} - {0, fold})
        assert all(sorted(f) == expected for f in rows["teacher_train_folds"])
        # the job itself: its held-out rows are exactly fold j, its training rows exactly the folds not in {0, j}
        job_dir = D.teacher_job_dir(storage, STUDENT, TEACHER, 0, fold)
        job = json.loads((job_dir / "job.json").read_text())
        metrics = json.loads((job_dir / "metrics.json").read_text())
        assert job["fold"] == fold and job["outer_fold"] == 0 and job["train_folds"] == expected
        assert 0 not in set(pd.read_parquet(job["data"])["fold"])
        n_rows = int(processed["fold"].isin(expected).sum())
        assert metrics["n_train"] == n_rows
        oof = pd.read_parquet(job_dir / "oof.parquet").set_index("id")
        assert sorted(oof.index) == sorted(processed.loc[processed["fold"] == fold, "id"])
        # one teacher: its blended probabilities are that job's predictions
        np.testing.assert_allclose(rows[D.TEACHER_COLUMNS].to_numpy(), oof.loc[rows["id"], list(PROB_COLUMNS)].to_numpy(),
                                   atol=1e-12)
    client = distilled["mlflow"].client()
    runs = client.search_runs([distilled["mlflow"].experiment_id()], f"tags.stage = '{D.STAGE}'")
    assert sorted((r.data.tags["outer_fold"], r.data.tags["fold"]) for r in runs) == [("0", "1"), ("0", "2")]
    assert all(r.info.status == "FINISHED" and np.isfinite(r.data.metrics["val_log_loss"]) for r in runs)


@pipeline
def test_student_trains_on_the_targets_and_predicts_its_fold(distilled):
    storage = distilled["storage"]
    processed = pd.read_parquet(storage.data("processed_folds"))
    out = storage.job_dir(STAGE1, STUDENT, 0)
    oof = pd.read_parquet(out / "oof.parquet")
    val = processed[processed["fold"] == 0].set_index("id")
    assert sorted(oof["id"]) == sorted(val.index) and (oof["fold"] == 0).all()
    loss = log_loss(label_index(val.loc[oof["id"]].reset_index()), oof[list(PROB_COLUMNS)].to_numpy())
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(loss) and loss == pytest.approx(metrics["val_log_loss"], abs=1e-9)
    assert metrics["n_train"] == int((processed["fold"] != 0).sum())
    data = pd.read_parquet(json.loads((out / "job.json").read_text())["data"])  # what the student trained on
    targets = pd.read_parquet(D.targets_path(storage, STUDENT, 0)).set_index("id")
    train = data[data["fold"] != 0].set_index("id")
    assert len(train) == len(targets)
    np.testing.assert_allclose(train[D.TARGETS].to_numpy(), targets.loc[train.index, D.TARGETS].to_numpy())


@pipeline
def test_leak_check_passes_on_the_asset_and_fails_on_leaky_files(distilled, tmp_path):
    (check,) = distilled["result"].get_asset_check_evaluations()
    assert check.check_name == "distill_targets_no_leakage" and check.passed
    assert check.metadata["folds.0.rows_teacher_trained_on_outer_fold"].value == 0
    storage = distilled["storage"]
    leaky = ArenaStorage(home=str(tmp_path / "arena"))
    shutil.copytree(storage.root, leaky.root, dirs_exist_ok=True)
    path = D.targets_path(leaky, STUDENT, 0)
    clean = pd.read_parquet(path)
    jobs = json.loads(D.teacher_jobs_file(leaky, STUDENT, 0).read_text())
    for job in jobs:  # point the copy's job list at the copy's job folders
        job["job_dir"] = str(leaky.root / Path(job["job_dir"]).relative_to(storage.root))
    D.teacher_jobs_file(leaky, STUDENT, 0).write_text(json.dumps(jobs))
    assert D.leakage_report(leaky, STUDENT, (0,))["passed"]

    # 1. two rows whose targets came from a teacher that trained on fold 0 (the plain stage-1 OOF's mistake)
    frame = clean.copy()
    rows = frame.index[frame["fold"] == 1][:2]
    for i in rows:
        frame.at[i, "teacher_train_folds"] = [-1, 0, 2]
    frame.to_parquet(path)
    report = D.leakage_report(leaky, STUDENT, (0,))
    assert not report["passed"] and report["leaky_folds"] == [0]
    assert report["folds"]["0"]["rows_teacher_trained_on_outer_fold"] == 2
    assert report["folds"]["0"]["rows_teacher_trained_on_own_fold"] == 0
    assert report["folds"]["0"]["rows_not_matching_a_teacher_job"] == 2  # their job trained on {-1, 2}
    # the Dagster check itself, on the leaky state folder
    from arena_pipeline.checks import build_distillation_checks

    (check_def,) = build_distillation_checks(distilled["profile"])
    result = check_def(storage=leaky)
    assert not result.passed and result.metadata["folds.0.rows_teacher_trained_on_outer_fold"].value == 2
    assert result.metadata["leaky_folds"].text == "0"
    # and it blocks: a run of the check and the student on the leaky folder fails the check, the student never runs
    blocked = dg.materialize([*distilled["assets"], check_def], partition_key="0", raise_on_error=False,
                             selection=dg.AssetSelection.checks(check_def) | dg.AssetSelection.assets(oof_asset_name(STAGE1, STUDENT)),
                             resources={"storage": leaky, "io_manager": AssetFiles(storage=leaky), "mlflow": distilled["mlflow"],
                                        "launcher": JobLauncher()})
    assert [c.passed for c in blocked.get_asset_check_evaluations()] == [False]
    assert not blocked.success and not blocked.get_asset_materialization_events()

    # 2. a row whose teacher trained on the row's own fold
    frame = clean.copy()
    i = frame.index[frame["fold"] == 2][0]
    frame.at[i, "teacher_train_folds"] = [-1, 1, 2]
    frame.to_parquet(path)
    report = D.leakage_report(leaky, STUDENT, (0,))
    assert not report["passed"] and report["folds"]["0"]["rows_teacher_trained_on_own_fold"] == 1

    # 3. provenance rows clean, but a teacher job's record says it trained on fold 0
    clean.to_parquet(path)
    job_file = Path(jobs[0]["job_dir"]) / "job.json"
    job = json.loads(job_file.read_text())
    job["train_folds"] = sorted({*job["train_folds"], 0})
    job_file.write_text(json.dumps(job))
    report = D.leakage_report(leaky, STUDENT, (0,))
    assert not report["passed"] and len(report["folds"]["0"]["teacher_jobs_trained_on_outer_fold"]) == 1
