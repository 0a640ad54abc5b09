"""hpo_<model>: an optuna study of real `gpu_jobs.train` launches on the smoke profile; MLflow child run per
trial, a best config, resumed (trials added) by a second materialisation; the OOF asset's opt-in use of it."""

import json

import dagster as dg
import optuna
import pytest
import yaml

from arena_pipeline.assets.processed_folds import build_folds_asset
from arena_pipeline.assets.hpo import best_config_path, build_hpo_assets, study_storage_url
from arena_pipeline.assets.oof import STAGE1, build_oof_asset
from arena_pipeline.assets.raw import build_raw_assets
from arena_pipeline.profile import SMOKE
from arena_pipeline.resources.launcher import JobLauncher
from arena_pipeline.resources.asset_files import AssetFiles
from arena_pipeline.resources.storage import ArenaStorage
from arena_pipeline.resources.tracking import MlflowTracking

MODEL = "cross_encoder_minilm"
pytestmark = pytest.mark.slow  # real training launches: about a minute each on 2 loaded cores


def test_hpo_study_trials_runs_best_config_resume_and_oof_opt_in(tmp_path):
    storage = ArenaStorage(home=str(tmp_path / "arena"))
    mlflow = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    resources = {"storage": storage, "io_manager": AssetFiles(storage=storage), "mlflow": mlflow, "launcher": JobLauncher()}
    assert dg.materialize([*build_raw_assets(SMOKE), build_folds_asset(SMOKE)], resources=resources).success
    hpo_assets = build_hpo_assets(SMOKE)
    assert [a.key.to_user_string() for a in hpo_assets] == [f"hpo_{MODEL}"]  # features has no search space
    hpo = hpo_assets[0]

    def search(n_trials: int, **more):
        result = dg.materialize([dg.AssetSpec("processed_folds"), hpo], resources=resources, selection=[hpo.key],
                                run_config={"ops": {f"hpo_{MODEL}": {"config": {"n_trials": n_trials, **more}}}})
        assert result.success
        return result, {k: v.value for k, v in result.asset_materializations_for_node(f"hpo_{MODEL}")[0]
                        .metadata.items()}

    first, meta = search(3)
    assert meta["n_trials"] == 3 and meta["n_trials_added"] == 3
    runs = mlflow.client().search_runs([mlflow.experiment_id()], filter_string="tags.kind = 'hpo_trial'")
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.tags["optuna_trial"] for r in runs) == ["0", "1", "2"]
    assert all(r.data.tags.get("mlflow.parentRunId") for r in runs)  # child runs of the Dagster run's run
    assert all("val_log_loss" in r.data.metrics for r in runs)
    best = json.loads(best_config_path(storage, MODEL).read_text())
    values = sorted(r.data.metrics["val_log_loss"] for r in runs)
    assert best["n_trials"] == 3 and best["val_log_loss"] == pytest.approx(values[0])
    assert any(o.startswith("training.lr=") for o in best["overrides"])

    # resumes the stored study; this trial scores its validation fold every step (what pruning judges)
    second, meta = search(1, eval_every_steps=1)
    study = optuna.load_study(study_name=best["study"], storage=study_storage_url(storage))
    assert len(study.trials) == 4 and meta["n_trials_added"] == 1
    assert meta["n_trials"] + meta["n_trials_pruned"] == 4 and meta["n_trials_pruned"] <= 1
    scored = study.trials[3]
    assert scored.intermediate_values and min(scored.intermediate_values) == 1  # reported live through Pipes
    assert not any(t.intermediate_values for t in study.trials[:3])
    (run,) = mlflow.client().search_runs([mlflow.experiment_id()], filter_string="tags.optuna_trial = '3'")
    curve = mlflow.client().get_metric_history(run.info.run_id, "val_log_loss_at_step")
    assert sorted(m.step for m in curve) == sorted(scored.intermediate_values)
    best = json.loads(best_config_path(storage, MODEL).read_text())
    assert best["val_log_loss"] == pytest.approx(study.best_value)

    # opt-in: the OOF asset trains with the best trial's overrides; its resolved config and metadata show it
    oof = build_oof_asset(STAGE1, SMOKE.model(MODEL), SMOKE)
    result = dg.materialize([dg.AssetSpec("processed_folds"), oof], resources=resources, selection=[oof.key], partition_key=str(SMOKE.folds[0]),
                            run_config={"ops": {oof.op.name: {"config": {"use_hpo": True}}}})
    assert result.success
    meta = {k: v.value for k, v in result.asset_materializations_for_node(oof.op.name)[0].metadata.items()}
    assert meta["hpo"]["trial"] == best["trial"]
    resolved = yaml.safe_load((storage.job_dir(STAGE1, MODEL, SMOKE.folds[0]) / "model" / "config.yaml").read_text())
    assert resolved["training"]["lr"] == pytest.approx(best["params"]["training.lr"])


def test_pruning_relay_reports_scores_and_writes_the_stop_file_when_the_pruner_says_so(tmp_path):
    """A real optuna study with the asset's median pruner: a trial worse than the median of the completed ones
    at the same step is stopped through its stop file; a better one is not; every message still reaches MLflow."""
    from arena_pipeline.assets.hpo import pruning_relay

    study = optuna.create_study(direction="minimize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    for value in (0.90, 1.00):  # two completed trials with a score at step 2
        done = study.ask()
        done.report(value, 2)
        study.tell(done, value)
    seen: list = []

    class Log:
        def info(self, message):
            seen.append(("log", message))

    context = type("Context", (), {"log": Log()})()
    for score, pruned in ((1.40, True), (0.80, False)):
        trial = study.ask()
        stop = tmp_path / f"trial{trial.number}.stop"
        relay = pruning_relay(context, trial, seen.append, stop)
        relay({"kind": "step", "step": 1, "loss": 1.1, "lr": 1e-4})
        assert not stop.exists()  # training steps are relayed, not judged
        relay({"kind": "val", "step": 2, "val_log_loss": score})
        assert stop.exists() is pruned and trial.storage.get_trial(trial._trial_id).intermediate_values == {2: score}
        study.tell(trial, state=optuna.trial.TrialState.PRUNED) if pruned else study.tell(trial, score)
    assert [m for m in seen if isinstance(m, dict) and m["kind"] == "val"] == [
        {"kind": "val", "step": 2, "val_log_loss": 1.40}, {"kind": "val", "step": 2, "val_log_loss": 0.80}]
    assert [s for s in seen if isinstance(s, tuple) and "pruned at step 2" in s[1]]
    assert [t.state for t in study.trials][2:] == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE]


def test_a_students_trials_train_on_its_teachers_targets(tmp_path):
    """A distillation student's study depends on its targets asset and launches its trials on the student's data
    file (as its OOF asset does), never on processed_folds' plain labels: without the targets it stops, naming them."""
    from arena_pipeline.profile import load_profile

    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump({
        "models": [{"name": "features", "config": "features.yaml"},
                   {"name": "minilm_student", "config": "cross_encoder_minilm.yaml", "distill": {"teacher": ["features"]}}],
        "n_folds": 3, "max_labelled_rows": 240, "max_external_rows": 60, "max_unlabelled_rows": 48,
    }))
    profile = load_profile(str(path))
    (hpo,) = build_hpo_assets(profile)
    assert dg.AssetKey("distill_targets_minilm_student") in hpo.asset_deps[hpo.key]
    storage = ArenaStorage(home=str(tmp_path / "arena"))
    resources = {"storage": storage, "io_manager": AssetFiles(storage=storage), "launcher": JobLauncher(),
                 "mlflow": MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")}
    assert dg.materialize([*build_raw_assets(profile), build_folds_asset(profile)], resources=resources).success
    result = dg.materialize([dg.AssetSpec("processed_folds"), hpo], resources=resources, selection=[hpo.key],
                            raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = str(failure.event_specific_data.error)
    assert "minilm_student: no distillation targets for fold" in message and "distill_targets_minilm_student" in message
    assert not (storage.root / "hpo" / "minilm_student").exists() or not any(
        (storage.root / "hpo" / "minilm_student").glob("trial*"))  # no trial launched on the plain labels
