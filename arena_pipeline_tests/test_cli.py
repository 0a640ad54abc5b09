"""`arena-pipeline` commands run as subprocesses against the smoke run's instance and bundle."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from arena_pipeline.config import REPO_ROOT, SHIPPED

pytestmark = pytest.mark.slow


def cli(args, home: Path, timeout=600, cwd=REPO_ROOT):
    env = {**os.environ, "DAGSTER_HOME": str(home), "ARENA_PROFILE": "smoke"}
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


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
