"""`arena-pipeline` commands run as subprocesses against the smoke run's instance and bundle."""

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from arena_pipeline.config import REPO_ROOT, SHIPPED
from arena_pipeline_tests.ui.support import free_port as _free_port
from arena_pipeline_tests.ui.support import wait_http as _wait_http

pytestmark = pytest.mark.slow


def cli(args, home: Path, timeout=600):
    env = {**os.environ, "DAGSTER_HOME": str(home), "ARENA_PROFILE": "smoke"}
    return subprocess.run([sys.executable, "-m", "arena_pipeline.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


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
