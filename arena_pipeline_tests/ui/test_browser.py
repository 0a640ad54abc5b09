"""A new user's first session, in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright)
against a real `arena-pipeline ui` (smoke profile, its own DAGSTER_HOME, free ports).

The tests run in file order and share one UI: open the asset graph; materialise fold 0 of
`stage1_oof_features` from its asset page and watch the run succeed; see its plots drawn on the asset page;
start the MiniLM cross-encoder and cancel it from the run page (its `accelerate` process group ends, its
MLflow run ends KILLED); switch the new-files sensor on and see a tick; open MLflow on the runs table, select
two runs and compare them. Screenshots: ``<DAGSTER_HOME>/screenshots/`` or ``$ARENA_SCREENSHOTS`` (printed).
Skipped when there is no Chromium (`apt-get install chromium`) or no Playwright (`pip install playwright`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from arena_pipeline.profile import REPO_ROOT
from arena_pipeline_tests.ui.support import UiProcess, graphql

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium on PATH (Debian: apt-get install -y chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                                             "(pip install playwright; the system Chromium is used)")

SLOW_ASSET = "stage1_oof_cross_encoder_minilm"
PREREQUISITES = """
import dagster as dg
from arena_pipeline.definitions import defs
from arena_pipeline_tests.reliability_support import materialise
with dg.DagsterInstance.get() as instance:
    result = materialise(defs, ["raw_labelled", "raw_external", "processed_folds"], instance)
    assert result.success
"""
TICK = re.compile(r"^\d+ runs? requested$")
RUN_QUERY = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"""


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """`arena-pipeline ui` on a state folder whose data assets are already materialised (in process: faster
    than a run per step), stopped with SIGTERM at the end."""
    home = tmp_path_factory.mktemp("browser_home")
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "ARENA_PROFILE": "smoke",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))}
    prereq = subprocess.run([sys.executable, "-c", PREREQUISITES], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert prereq.returncode == 0, prereq.stderr[-3000:]
    server = UiProcess(home, home / "ui.log")
    try:
        server.wait_ready()
        yield server
    finally:
        code = server.stop()
        assert code == 0, server.output()[-3000:]


@pytest.fixture(scope="module")
def shots(ui) -> Path:
    folder = Path(os.environ.get("ARENA_SCREENSHOTS") or ui.home / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def page(ui):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        context.set_default_timeout(60_000)
        yield context.new_page()
        browser.close()


def _expect():
    return sync_api.expect


def _runs(ui) -> list[dict]:
    query = "{ runsOrError { ... on Runs { results { runId status jobName assetSelection { path } } } } }"
    return graphql(ui.dagster_port, query)["runsOrError"]["results"]


def _run_status(ui, run_id: str) -> str:
    return graphql(ui.dagster_port, RUN_QUERY, {"id": run_id})["runOrError"]["status"]


def _materialise_from_asset_page(page, ui, asset: str) -> str:
    """Asset page -> Materialize… -> partition 0 -> Launch 1 run -> the toast's View; returns the run id."""
    page.goto(f"{ui.dagster_url}/assets/{asset}")
    page.get_by_role("button", name="Materialize…").click()
    page.get_by_text("Select a partition or create one").click()
    page.keyboard.type("0")
    page.get_by_text("Select all (1)").click()  # the smoke profile's one fold: partition "0"
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Launch 1 run").click()
    _expect()(page.get_by_text("Launched run")).to_be_visible()
    page.get_by_text("View", exact=True).click()  # the "Launched run …" toast
    page.wait_for_url(re.compile(r".*/runs/[0-9a-f-]{36}.*"))
    return re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)


def _wait_status(ui, run_id: str, wanted: set[str], timeout: float = 300) -> str:
    deadline = time.time() + timeout
    status = None
    while time.time() < deadline:
        status = _run_status(ui, run_id)
        if status in wanted:
            return status
        if status in {"SUCCESS", "FAILURE", "CANCELED"}:
            break
        time.sleep(1)
    raise AssertionError(f"run {run_id} is {status}, expected one of {wanted}")


def _mlflow(ui, path: str, payload: dict | None = None) -> dict:
    url = f"{ui.mlflow_url}/api/2.0/mlflow/{path}"
    if payload is None:
        return json.loads(urllib.request.urlopen(url, timeout=30).read())
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def _job_runs(ui, model: str) -> list[dict]:
    exp = _mlflow(ui, "experiments/get-by-name?experiment_name=arena-pipeline")["experiment"]["experiment_id"]
    found = _mlflow(ui, "runs/search", {"experiment_ids": [exp],
                                        "filter": f"tags.kind = 'job' and tags.model = '{model}'"})
    return found.get("runs", [])


def test_asset_graph_opens(page, ui, shots):
    page.goto(f"{ui.dagster_url}/asset-groups")
    for group in ("inputs", "stage1", "ensembles", "pseudo_labelling", "stage2"):  # the graph's groups
        _expect()(page.get_by_text(group, exact=True).first).to_be_visible()
    assert page.get_by_text("Join the Dagster community").count() == 0  # nux is off in dagster.yaml
    page.screenshot(path=shots / "01_asset_graph.png")


def test_materialise_one_fold_from_the_asset_page(page, ui, shots):
    run_id = _materialise_from_asset_page(page, ui, "stage1_oof_features")
    _expect()(page.get_by_text(re.compile(r"^(Queued|Starting|Started|Success)$")).first).to_be_visible()
    page.screenshot(path=shots / "02_features_run_started.png")
    assert _wait_status(ui, run_id, {"SUCCESS"}) == "SUCCESS"  # dequeued and run by the daemon
    page.reload()
    _expect()(page.get_by_text("Success").first).to_be_visible()
    page.screenshot(path=shots / "03_features_run_succeeded.png")
    (run,) = _job_runs(ui, "features")
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    metrics = {m["key"] for m in run["data"].get("metrics", [])}
    assert params["fold"] == "0" and "fold" not in metrics and "val_log_loss" in metrics


def test_plots_are_drawn_on_the_asset_page(page, ui, shots):
    page.goto(f"{ui.dagster_url}/assets/stage1_oof_features")
    image = page.locator("img[src*='get-artifact'][alt='confusion_matrix']").first
    image.scroll_into_view_if_needed()
    _expect()(image).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=image.element_handle())
    assert page.get_by_text("[Show Markdown]").count() == 0
    page.screenshot(path=shots / "04_asset_page_plots.png")


def test_cancel_a_training_run_from_the_run_page(page, ui, shots):
    run_id = _materialise_from_asset_page(page, ui, SLOW_ASSET)
    jobs = ui.home / "jobs"
    deadline = time.time() + 300
    entry = None
    while time.time() < deadline and entry is None:  # the accelerate process group is up
        for path in jobs.glob("*.json") if jobs.is_dir() else []:
            data = json.loads(path.read_text())
            if data["run_id"] == run_id:
                entry = data
        time.sleep(0.2)
    assert entry is not None, f"the {SLOW_ASSET} job never started (run {_run_status(ui, run_id)})"
    page.get_by_role("button", name="Terminate").click()
    page.get_by_role("dialog").get_by_role("button", name=re.compile("Terminate")).click()
    start = time.time()
    assert _wait_status(ui, run_id, {"CANCELED"}, timeout=120) == "CANCELED"
    cancel_s = time.time() - start
    page.reload()
    _expect()(page.get_by_text("Canceled").first).to_be_visible()
    page.screenshot(path=shots / "05_minilm_run_canceled.png")
    with pytest.raises(ProcessLookupError):  # the whole accelerate process group is gone
        os.killpg(entry["pgid"], 0)
    deadline = time.time() + 30
    while time.time() < deadline and [r["info"]["status"] for r in _job_runs(ui, "cross_encoder_minilm")] != ["KILLED"]:
        time.sleep(1)
    assert [r["info"]["status"] for r in _job_runs(ui, "cross_encoder_minilm")] == ["KILLED"]
    print(f"cancelled in {cancel_s:.1f} s")


def test_switch_the_sensor_on_and_see_a_tick(page, ui, shots):
    page.goto(f"{ui.dagster_url}/locations/arena_pipeline/sensors/new_unlabelled_files_sensor")
    switch = page.locator("input[type=checkbox]").first  # the sensor's on/off switch (a styled checkbox)
    _expect()(switch).not_to_be_checked()
    page.locator("label[for='checkbox-0']").first.click()
    _expect()(switch).to_be_checked()
    deadline = time.time() + 120  # the daemon evaluates a switched-on sensor within its interval (60 s)
    while True:
        page.reload()
        try:  # wait for the page to render the tick table (a count right after the reload reads an empty page)
            _expect()(page.get_by_text(TICK).first).to_be_visible(timeout=10_000)  # no new files: no run requested
            break
        except AssertionError:
            if time.time() > deadline:
                raise
    page.screenshot(path=shots / "06_sensor_tick.png")


def test_mlflow_opens_on_the_runs_table_and_compares_two_runs(page, ui, shots):
    url = re.search(r"MLflow UI:\s+(\S+)", ui.output()).group(1)  # the link `arena-pipeline ui` prints
    page.goto(url)
    _expect()(page.get_by_text("Training runs").first).to_be_visible()
    if page.get_by_text("MLflow Assistant").count():
        page.get_by_role("button", name="Close").click()  # the assistant panel MLflow 3.17 opens on a first visit
    page.screenshot(path=shots / "07_mlflow_runs.png")
    page.goto(url + "?searchFilter=" + urllib.request.quote("tags.kind = 'job'"))  # the training-job runs
    expanders = page.locator("button[data-component-id*='runnamecellrenderer']")  # a parent run's [+]
    _expect()(expanders.first).to_be_visible()
    for index in range(expanders.count()):
        expanders.nth(index).click()
    for name in ("stage1/features/fold0", "stage1/cross_encoder_minilm/fold0"):
        page.locator("[role=row]", has_text=name).get_by_role("checkbox").check()
    page.screenshot(path=shots / "08_mlflow_two_runs_selected.png")
    page.get_by_role("button", name="Compare").click()
    page.wait_for_url(re.compile(r".*compare-runs.*"))
    _expect()(page.get_by_text("val_log_loss").first).to_be_visible()
    page.screenshot(path=shots / "09_mlflow_compare.png", full_page=True)
