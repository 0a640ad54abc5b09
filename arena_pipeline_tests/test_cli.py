"""`arena-pipeline` commands run as subprocesses against the smoke run's instance and bundle."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from datetime import datetime
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from arena_pipeline.calibration import with_tie_prior
from arena_pipeline.cli import MODELS, OUTPUT_FORMATS, STAGES
from arena_pipeline.profile import PROFILES, REPO_ROOT, SHIPPED, SMOKE
from arena_pipeline.resources.tracking import MlflowTracking
from arena_pipeline_tests.ui.support import free_port as _free_port
from arena_pipeline_tests.ui.support import wait_http as _wait_http

pytestmark = pytest.mark.slow


def cli(args, home: Path, timeout=600, cwd=REPO_ROOT, **env_extra):
    env = {**os.environ, "DAGSTER_HOME": str(home), "ARENA_PROFILE": "smoke", **env_extra}
    return subprocess.run([sys.executable, "-m", "arena_pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def kaggle_test(tmp_path_factory):
    """A Kaggle-format test.csv (id, prompt, response_a, response_b) and its labels, from PandaLM rows."""
    folder = tmp_path_factory.mktemp("kaggle")
    rows = pd.read_parquet(SHIPPED / "pandalm_test.parquet").head(12)
    rows[["id", "prompt", "response_a", "response_b"]].to_csv(folder / "test.csv", index=False)
    rows[["id", "prompt", "response_a", "response_b", "winner_model_a", "winner_model_b", "winner_tie"]].to_csv(
        folder / "labels.csv", index=False)
    return folder


def test_predict_writes_a_submission(smoke_run, kaggle_test):
    out = kaggle_test / "submission.csv"
    proc = cli(["predict", "--input", str(kaggle_test / "test.csv"), "--output", str(out)], smoke_run["home"])
    assert proc.returncode == 0, proc.stderr
    sub = pd.read_csv(out)
    assert list(sub.columns) == ["id", "winner_model_a", "winner_model_b", "winner_tie"]
    assert len(sub) == 12 and sub["id"].astype(str).tolist() == pd.read_csv(kaggle_test / "test.csv")["id"].astype(str).tolist()
    assert (sub.iloc[:, 1:].sum(axis=1) - 1).abs().max() < 1e-6
    assert "rows/s" in proc.stdout


def test_predict_adapts_the_tie_prior_and_stays_swap_consistent(smoke_run, tmp_path):
    rows = pd.read_parquet(SHIPPED / "llmbar.parquet").head(150)  # expert pairs without ties
    cols = ["id", "prompt", "response_a", "response_b"]
    rows[cols].to_csv(tmp_path / "pairs.csv", index=False)
    rows.rename(columns={"response_a": "response_b", "response_b": "response_a"})[cols].to_csv(
        tmp_path / "swapped.csv", index=False)
    outs = {}
    for name in ("pairs", "swapped"):
        proc = cli(["predict", "--adapt-tie-prior", "--input", str(tmp_path / f"{name}.csv"),
                    "--output", str(tmp_path / f"{name}_scores.csv")], smoke_run["home"])
        assert proc.returncode == 0, proc.stderr
        assert "tie prior by EM" in proc.stdout
        outs[name] = pd.read_csv(tmp_path / f"{name}_scores.csv")
    report = json.loads((tmp_path / "pairs_scores.priors.json").read_text())
    manifest = json.loads((smoke_run["storage"].bundle_dir / "bundle.json").read_text())
    assert report["adapted"] and report["rows"] == 150
    assert report["tie_prior_train"] == pytest.approx(manifest["oof_mean_tie"])
    assert 0.01 <= report["tie_prior_estimated"] <= 0.5
    plain = cli(["predict", "--input", str(tmp_path / "pairs.csv"), "--output", str(tmp_path / "plain.csv")],
                smoke_run["home"])
    assert plain.returncode == 0, plain.stderr
    unadapted = pd.read_csv(tmp_path / "plain.csv")
    probs = ["winner_model_a", "winner_model_b", "winner_tie"]
    # the adapted probabilities are the bundle's own under the estimated tie prior (Bayes' rule, A/B kept even)
    expected = with_tie_prior(unadapted[probs].to_numpy(), report["tie_prior_train"], report["tie_prior_estimated"])
    assert abs(outs["pairs"][probs].to_numpy() - expected).max() < 1e-6
    # the swapped file gets the same tie estimate (the smoke bundle's MiniLM member is not swap-equivariant,
    # so its probabilities differ slightly; the A/B-even map itself is exact: test_calibration)
    swapped_report = json.loads((tmp_path / "swapped_scores.priors.json").read_text())
    assert swapped_report["tie_prior_estimated"] == pytest.approx(report["tie_prior_estimated"], abs=0.01)


def test_predict_with_a_stated_tie_rate_or_a_ties_possible_column(smoke_run, tmp_path):
    """--tie-rate moves the bundle's tie prior to the stated rate (Bayes' rule); 0 and a ties_possible=false
    column both take the tie out and keep A : B; giving --tie-rate with --adapt-tie-prior is refused."""
    rows = pd.read_parquet(SHIPPED / "pandalm_test.parquet").head(30)
    cols = ["id", "prompt", "response_a", "response_b"]
    rows[cols].to_csv(tmp_path / "pairs.csv", index=False)
    rows[cols].assign(ties_possible=[i % 2 == 0 for i in range(30)]).to_csv(tmp_path / "marked_pairs.csv", index=False)
    probs = ["winner_model_a", "winner_model_b", "winner_tie"]
    scores = {}
    for name, extra, file in (("plain", [], "pairs"), ("rate30", ["--tie-rate", "0.3"], "pairs"),
                              ("rate0", ["--tie-rate", "0"], "pairs"), ("marked", [], "marked_pairs")):
        proc = cli(["predict", *extra, "--input", str(tmp_path / f"{file}.csv"), "--output",
                    str(tmp_path / f"{name}.csv")], smoke_run["home"])
        assert proc.returncode == 0, proc.stderr
        scores[name] = pd.read_csv(tmp_path / f"{name}.csv")[probs].to_numpy()
    report = json.loads((tmp_path / "rate30.priors.json").read_text())
    assert report["tie_prior_given"] == 0.3 and report["rows"] == 30
    expected = with_tie_prior(scores["plain"], report["tie_prior_train"], 0.3)
    assert abs(scores["rate30"] - expected).max() < 1e-6 and scores["rate30"][:, 2].mean() > scores["plain"][:, 2].mean()
    assert np.all(scores["rate0"][:, 2] < 1e-12)
    ratio = scores["plain"][:, 0] / scores["plain"][:, 1]
    np.testing.assert_allclose(scores["rate0"][:, 0] / scores["rate0"][:, 1], ratio, rtol=1e-6)
    odd = np.arange(30) % 2 == 1
    np.testing.assert_allclose(scores["marked"][odd], scores["rate0"][odd], atol=1e-6)
    np.testing.assert_allclose(scores["marked"][~odd], scores["plain"][~odd], atol=1e-6)
    both = cli(["predict", "--adapt-tie-prior", "--tie-rate", "0.2", "--input", str(tmp_path / "pairs.csv"),
                "--output", str(tmp_path / "both.csv")], smoke_run["home"])
    assert both.returncode == 2 and "give one" in one_line(both.stderr) and not (tmp_path / "both.csv").exists()
    bad = cli(["predict", "--tie-rate", "1.5", "--input", str(tmp_path / "pairs.csv"), "--output",
               str(tmp_path / "bad.csv")], smoke_run["home"])
    assert bad.returncode == 2 and "[0, 1)" in bad.stderr


@pytest.mark.parametrize("case", ["missing_file", "missing_column", "unknown_bundle"])
def test_predict_bad_input_is_one_line_and_writes_nothing(smoke_run, kaggle_test, tmp_path, case):
    out = tmp_path / "out.csv"
    args = ["predict", "--input", str(kaggle_test / "test.csv"), "--output", str(out)]
    if case == "missing_file":
        args[2] = str(tmp_path / "nope.csv")
    elif case == "missing_column":
        bad = tmp_path / "bad.csv"
        pd.read_csv(kaggle_test / "test.csv").drop(columns=["response_b"]).to_csv(bad, index=False)
        args[2] = str(bad)
    else:
        args += ["--bundle", str(tmp_path / "no_bundle")]
    proc = cli(args, smoke_run["home"])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    expected = {"missing_file": "nope.csv", "missing_column": "response_b", "unknown_bundle": "no_bundle"}[case]
    assert expected in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("case", ["same_string", "dot_slash", "symlinked_input", "hard_link"])
def test_predict_refuses_to_overwrite_its_input(kaggle_test, isolated_home, tmp_path, case):
    """The output names the input file in another spelling: exit 2, one line naming both, input byte-identical."""
    shutil.copy(kaggle_test / "test.csv", tmp_path / "test.csv")
    inp, out = {"same_string": ("test.csv", "test.csv"), "dot_slash": ("test.csv", "./test.csv"),
                "symlinked_input": ("link.csv", "test.csv"), "hard_link": ("test.csv", "hard.csv")}[case]
    if case == "symlinked_input":
        (tmp_path / "link.csv").symlink_to(tmp_path / "test.csv")
    elif case == "hard_link":
        os.link(tmp_path / "test.csv", tmp_path / "hard.csv")
    before = sha256(tmp_path / "test.csv")
    proc = cli(["predict", "--input", inp, "--output", out], isolated_home, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert f"--output {out} " in line and f"--input {inp} " in line
    assert sha256(tmp_path / "test.csv") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"test.csv", Path(inp).name, Path(out).name})


def test_predict_refuses_to_write_into_the_bundle(smoke_run, kaggle_test):
    manifest = smoke_run["storage"].bundle_dir / "bundle.json"
    before = sha256(manifest)
    proc = cli(["predict", "--input", str(kaggle_test / "test.csv"), "--output", str(manifest)], smoke_run["home"])
    assert proc.returncode == 2 and "--bundle" in one_line(proc.stderr)
    assert sha256(manifest) == before


def test_predict_header_only_input_scores_zero_rows(smoke_run, tmp_path):
    header = tmp_path / "test.csv"
    header.write_text("id,prompt,response_a,response_b\n")
    before = sha256(header)
    proc = cli(["predict", "--input", "test.csv", "--output", "out.csv"], smoke_run["home"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "test.csv: header only, 0 rows scored -> out.csv"
    out = pd.read_csv(tmp_path / "out.csv")
    assert len(out) == 0 and list(out.columns) == ["id", "winner_model_a", "winner_model_b", "winner_tie"]
    assert sha256(header) == before


@pytest.mark.parametrize("case", ["plots_is_the_labels", "plot_hard_linked_to_labels"])
def test_evaluate_refuses_plots_over_an_input(kaggle_test, isolated_home, tmp_path, case):
    shutil.copy(kaggle_test / "labels.csv", tmp_path / "labels.csv")
    pd.read_csv(tmp_path / "labels.csv")[["id"]].assign(winner_model_a=0.4, winner_model_b=0.4, winner_tie=0.2).to_csv(
        tmp_path / "preds.csv", index=False)
    plots = "./labels.csv"
    if case == "plot_hard_linked_to_labels":
        plots = "plots"
        (tmp_path / "plots").mkdir()
        os.link(tmp_path / "labels.csv", tmp_path / "plots" / "confusion_matrix.png")
    before = {name: sha256(tmp_path / name) for name in ("labels.csv", "preds.csv")}
    proc = cli(["evaluate", "--predictions", "preds.csv", "--labels", "labels.csv", "--plots", plots],
               isolated_home, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert "--plots" in line and "--labels labels.csv" in line and "rows" not in proc.stdout
    assert {name: sha256(tmp_path / name) for name in before} == before


def test_evaluate_reports_numbers_and_plots(smoke_run, kaggle_test, tmp_path):
    sub = kaggle_test / "submission_eval.csv"
    assert cli(["predict", "--input", str(kaggle_test / "test.csv"), "--output", str(sub)],
               smoke_run["home"]).returncode == 0
    proc = cli(["evaluate", "--predictions", str(sub), "--labels", str(kaggle_test / "labels.csv"),
                "--plots", str(tmp_path / "plots")], smoke_run["home"])
    assert proc.returncode == 0, proc.stderr
    values = dict(line.split()[:2] for line in proc.stdout.splitlines() if line.startswith(("log_loss", "accuracy", "rows")))
    assert values["rows"] == "12" and 0.3 < float(values["log_loss"]) < 2.5 and 0 <= float(values["accuracy"]) <= 1
    assert "calibration" in proc.stdout
    assert (tmp_path / "plots" / "confusion_matrix.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "reliability.png").stat().st_size > 1000


def test_evaluate_rejects_nan_predictions(smoke_run, kaggle_test, tmp_path):
    bad = tmp_path / "bad_preds.csv"
    frame = pd.read_csv(kaggle_test / "labels.csv")[["id"]].assign(winner_model_a=0.5, winner_model_b=0.5, winner_tie=0.0)
    frame.loc[3, "winner_model_a"] = float("nan")
    frame.to_csv(bad, index=False)
    proc = cli(["evaluate", "--predictions", str(bad), "--labels", str(kaggle_test / "labels.csv")], smoke_run["home"])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert str(frame.loc[3, "id"]) in proc.stderr


def test_runs_lists_the_smoke_jobs(smoke_run):
    proc = cli(["runs", "--stage", "stage1"], smoke_run["home"])
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[1:]]
    assert {r[1] for r in rows} == {"features", "cross_encoder_minilm"}
    losses = [float(r[3]) for r in rows]
    assert losses == sorted(losses)  # sorted by validation log loss


def test_runs_lists_ensembles_of_the_smoke_run(smoke_run):
    proc = cli(["runs"], smoke_run["home"])
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[1:]]
    assert {r[0] for r in rows} == set(STAGES)  # every stage tag the pipeline logs is a --stage choice
    assert {(r[0], r[1], r[2]) for r in rows if r[1] == "ensemble"} == {("stage1_ensemble", "ensemble", "all"),
                                                                       ("final_ensemble", "ensemble", "all")}
    assert {r[6] for r in rows} == {"FINISHED"} and {r[8] for r in rows} == {smoke_run["result"].run_id}


def test_runs_table_has_status_start_and_full_links(isolated_home, tmp_path):
    """Runs logged the way the assets log them (MlflowTracking.log_job, ensembles.log_ensemble) into a fresh store."""
    from arena_pipeline.assets.ensembles import log_ensemble

    tracking = MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    spec = tmp_path / "final_ensemble.json"
    spec.write_text("{}")
    summary = {"method": "powell", "weights": {"stage2/features": 1.0}, "folds": [0], "temperature": 1.1,
               "uniform_blend_log_loss": 1.05, "fitted_blend_log_loss_in_sample": 0.98, "fitted_blend_log_loss_cv": 0.99,
               "fitted_blend_accuracy": 0.5, "class_prior_log_loss": 1.09, "n_rows": 59,
               "member_log_loss": {"stage2/features": 1.02}, "per_class_loss": {"a": 1.0, "b": 1.0, "tie": 1.0}}

    @dg.asset
    def fits(context: dg.AssetExecutionContext, mlflow: MlflowTracking) -> None:
        mlflow.log_job(context, stage="stage2", model="features", fold=0, params={"training": {"lr": 0.1}},
                       metrics={"val_log_loss": 1.02, "val_accuracy": 0.44, "train_examples_per_s": 400.0})
        log_ensemble(context, mlflow, "final_ensemble", summary, {}, spec)

    result = dg.materialize([fits], resources={"mlflow": tracking})
    client = tracking.client()
    exp = client.get_experiment_by_name("arena-pipeline").experiment_id
    logged = {r.data.tags["model"]: r for r in client.search_runs([exp], "tags.kind != 'pipeline'")}
    proc = cli(["runs"], isolated_home, ARENA_MLFLOW_URI=tracking.uri)
    assert proc.returncode == 0, proc.stderr
    header, *lines = proc.stdout.splitlines()
    assert header.split() == ["stage", "model", "fold", "val_log_loss", "val_acc", "train_ex/s", "status", "start",
                              "dagster_run", "mlflow_run"]
    rows = [line.split() for line in lines]
    assert [r[:5] for r in rows] == [["final_ensemble", "ensemble", "all", "0.9900", "0.500"],  # best loss first
                                     ["stage2", "features", "0", "1.0200", "0.440"]]
    for row in rows:
        run = logged[row[1]]
        assert row[6] == "FINISHED" and row[8] == result.run_id
        assert row[7] == datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%dT%H:%M:%S")
        assert row[9] == f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{run.info.run_id}"


@pytest.mark.parametrize("args", [["runs", "--stage", "bogus"], ["runs", "--model", "bogus"],
                                  ["demo", "--job", "bogus"], ["demo", "--profile", "bogus"], ["bogus"], ["demo"]])
def test_unknown_values_are_one_line_exit_2(isolated_home, args):
    proc = cli(args, isolated_home, ARENA_PROFILE="bogus")  # `demo` alone takes its profile from ARENA_PROFILE
    assert proc.returncode == 2 and proc.stdout == ""
    assert "bogus" in one_line(proc.stderr) and ("invalid choice" in proc.stderr or "unknown profile" in proc.stderr)


@pytest.mark.parametrize("command", ["demo", "predict", "evaluate", "runs", "ui"])
def test_help_names_choices_examples_and_exit_codes(isolated_home, command):
    from arena_pipeline.jobs import JOBS, build_jobs

    proc = cli([command, "--help"], isolated_home)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps long lines
    assert "examples: arena-pipeline " + command in text and "exit codes: 0 success" in text
    expected = {"demo": [*JOBS, *PROFILES, "1 the run failed", "2 unknown --profile or --job"],
                "predict": [*OUTPUT_FORMATS, "2 bad input", "output that is an input"],
                "evaluate": ["2 bad input", "plots over an input"],
                "runs": [*STAGES, *MODELS, "status", "start", "2 unknown --stage or --model"],
                "ui": ["Ctrl-C"]}[command]
    assert [word for word in expected if word not in text] == []
    if command == "demo":  # the choices are the jobs the code location defines
        assert list(JOBS) == [job.name for job in build_jobs(SMOKE)]


def _post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def test_ui_serves_dagster_graphql_and_mlflow_rest(smoke_run):
    dport, mport = _free_port(), _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(smoke_run["home"]), "ARENA_PROFILE": "smoke"}
    proc = subprocess.Popen([sys.executable, "-m", "arena_pipeline.cli", "ui", "--dagster-port", str(dport),
                             "--mlflow-port", str(mport)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{dport}/server_info")
        _wait_http(f"http://127.0.0.1:{mport}/health")
        query = "{ assetNodes { assetKey { path } assetMaterializations(limit: 1) { runId } } }"
        nodes = _post_json(f"http://127.0.0.1:{dport}/graphql", {"query": query})["data"]["assetNodes"]
        materialised = {"/".join(n["assetKey"]["path"]): n["assetMaterializations"] for n in nodes}
        assert "predictor_bundle" in materialised and "stage1_oof_features" in materialised
        assert materialised["final_ensemble"][0]["runId"] == smoke_run["result"].run_id
        exp = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{mport}/api/2.0/mlflow/experiments/get-by-name?experiment_name=arena-pipeline").read())
        runs = _post_json(f"http://127.0.0.1:{mport}/api/2.0/mlflow/runs/search",
                          {"experiment_ids": [exp["experiment"]["experiment_id"]], "filter": "tags.kind = 'job'"})
        assert len(runs["runs"]) == 4
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the CLI stops both servers
        proc.wait(timeout=60)
    for port in (dport, mport):
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3)
