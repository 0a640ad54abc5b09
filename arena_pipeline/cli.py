"""`arena-pipeline`: run the demo, score files with a bundle, evaluate predictions, list runs, start the UIs.

Exit codes: 0 success; 1 the pipeline or a job failed; 2 bad input (missing file or column, unknown bundle,
invalid predictions) — reported as one line on stderr, nothing written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from arena_pipeline.config import PROFILES, REPO_ROOT, dagster_home

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class InputError(Exception):
    """Bad input from the user: one line, exit code 2."""


def _ensure_instance() -> Path:
    home = dagster_home()
    os.environ["DAGSTER_HOME"] = str(home)
    if not (home / "dagster.yaml").exists():
        shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    return home


def _write_table(frame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if path.suffix == ".parquet":
        frame.to_parquet(tmp, index=False)
    elif path.suffix in (".jsonl", ".json"):
        frame.to_json(tmp, orient="records", lines=True)
    else:
        frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


# ---------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    os.environ["ARENA_PROFILE"] = args.profile
    home = _ensure_instance()
    import dagster as dg

    from arena_pipeline.definitions import build_definitions
    from arena_pipeline.partitions import fold_range_tags

    profile = PROFILES[args.profile]
    defs = build_definitions(profile)
    job = defs.resolve_job_def(args.job)
    print(f"arena-pipeline: running {args.job} on profile '{profile.name}' (state in {home})", flush=True)
    if profile.differences:
        print(f"profile '{profile.name}' differs from 'full' in (everything else is 'full'):\n  "
              + "\n  ".join(profile.differences), flush=True)
    start = time.time()
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(instance=instance, tags=fold_range_tags(profile), raise_on_error=False)
        stats = instance.get_run_step_stats(result.run_id)
    wall = time.time() - start
    print("\nwall time per asset:")
    for step in stats:
        if step.end_time and step.start_time:
            print(f"  {step.step_key:<40} {step.end_time - step.start_time:7.1f} s  {step.status.value}")
    print(f"  {'total':<40} {wall:7.1f} s")
    if not result.success:
        print(f"arena-pipeline: run {result.run_id} failed; see `arena-pipeline ui` or the log above", file=sys.stderr)
        return EXIT_FAILED
    _print_summary(profile)
    return EXIT_OK


def _print_summary(profile) -> None:
    import json

    from arena_pipeline.resources.storage import ArenaStorage

    storage = ArenaStorage(home=os.environ.get("ARENA_STORAGE_HOME", ""))
    path = storage.ensemble("final_ensemble")
    if not path.exists():
        return
    spec = json.loads(path.read_text())
    best = min(spec["member_log_loss"], key=spec["member_log_loss"].get)
    print(f"\nfold(s) {spec['folds']} out-of-fold log loss on {spec['n_rows']} human/judge-labelled rows:")
    print(f"  final ensemble (cross-validated) {spec['fitted_blend_log_loss_cv']:.4f}"
          f"   (in sample {spec['fitted_blend_log_loss_in_sample']:.4f})")
    print(f"  best single member               {spec['member_log_loss'][best]:.4f}   ({best})")
    print(f"  class prior                      {spec['class_prior_log_loss']:.4f}")
    print(f"\nbundle: {storage.bundle_dir}\nscore a file: arena-pipeline predict --input test.csv --output submission.csv")


# ---------------------------------------------------------------- predict
def cmd_predict(args) -> int:
    import pandas as pd

    from arena_pipeline.bundle import BundleError, load_manifest, score_frame, submission_frame
    from arena_pipeline.data.clean import clean_frame
    from arena_pipeline.data.load import read_table
    from arena_pipeline.data.schema import DataError
    from arena_pipeline.resources.storage import ArenaStorage

    bundle = Path(args.bundle) if args.bundle else ArenaStorage().bundle_dir
    try:
        load_manifest(bundle)
        raw = read_table(args.input)
        frame, _ = clean_frame(raw, file=str(args.input), labelled=False, dedupe=False)
    except (DataError, BundleError) as err:
        raise InputError(str(err)) from None
    start = time.time()
    from tqdm import tqdm

    bar = tqdm(desc="members x folds", unit="model", file=sys.stderr)
    probs = score_frame(bundle, frame, progress=lambda key, fold: bar.update(1))
    bar.close()
    wall = time.time() - start
    out = submission_frame(frame["id"], probs)
    _write_table(out, Path(args.output))
    print(f"wrote {len(out)} rows to {args.output} ({len(out) / max(wall, 1e-9):.1f} rows/s, {wall:.1f} s)")
    return EXIT_OK


# ---------------------------------------------------------------- evaluate
def cmd_evaluate(args) -> int:
    import numpy as np

    from arena_pipeline import ensemble as ens
    from arena_pipeline import plots
    from arena_pipeline.data.clean import clean_frame
    from arena_pipeline.data.folds import label_index
    from arena_pipeline.data.load import read_predictions, read_table
    from arena_pipeline.data.schema import DataError

    try:
        preds = read_predictions(args.predictions)
        labels_raw = read_table(args.labels)
        labels, _ = clean_frame(labels_raw, file=str(args.labels), labelled=True, dedupe=False)
    except DataError as err:
        raise InputError(str(err)) from None
    preds = preds.set_index("id")
    missing = [i for i in labels["id"] if i not in preds.index]
    if missing:
        raise InputError(f"{args.predictions}: row id={missing[0]}: column 'id': no prediction for this labelled row "
                         f"({len(missing)} missing). Score every row of {args.labels}.")
    columns = [c for c in ("p_a", "p_b", "p_tie") if c in preds.columns] or ["winner_model_a", "winner_model_b", "winner_tie"]
    p = preds.loc[labels["id"], columns].to_numpy(dtype=float)
    y = label_index(labels)
    report = {"rows": len(y), "log_loss": ens.log_loss3(y, p), "accuracy": ens.accuracy(y, p),
              **{f"loss_{k}": v for k, v in ens.per_class_loss(y, p).items()},
              "class_prior_log_loss": ens.log_loss3(y, np.tile(np.bincount(y, minlength=3) / len(y), (len(y), 1)))}
    for key, value in report.items():
        print(f"{key:<22} {value:.4f}" if isinstance(value, float) else f"{key:<22} {value}")
    print("\ncalibration (max-probability bins):")
    print(f"  {'bin':<11} {'rows':>5} {'confidence':>10} {'accuracy':>9}")
    for row in plots.reliability_table(y, p):
        print(f"  {row['bin']:<11} {row['rows']:>5} {row['confidence']:>10.3f} {row['accuracy']:>9.3f}")
    if args.plots:
        folder = Path(args.plots)
        plots.confusion_matrix(y, p, folder / "confusion_matrix.png")
        plots.reliability_diagram(y, p, folder / "reliability.png")
        print(f"\nplots: {folder / 'confusion_matrix.png'}, {folder / 'reliability.png'}")
    return EXIT_OK


# ---------------------------------------------------------------- runs
def cmd_runs(args) -> int:
    from arena_pipeline.resources.tracking import MlflowTracking

    tracking = MlflowTracking(tracking_uri=os.environ.get("ARENA_MLFLOW_URI", ""))
    client = tracking.client()
    exp = client.get_experiment_by_name(tracking.experiment)
    if exp is None:
        print("no runs yet: run `arena-pipeline demo` first")
        return EXIT_OK
    filters = ["tags.kind = 'job'"]
    if args.stage:
        filters.append(f"tags.stage = '{args.stage}'")
    if args.model:
        filters.append(f"tags.model = '{args.model}'")
    runs = client.search_runs([exp.experiment_id], filter_string=" and ".join(filters), max_results=1000)
    rows = sorted(runs, key=lambda r: r.data.metrics.get("val_log_loss", float("inf")))
    print(f"{'stage':<7} {'model':<26} {'fold':>4} {'val_log_loss':>12} {'val_acc':>8} {'train_ex/s':>10} "
          f"{'dagster_run':<10} mlflow_run")
    for run in rows:
        m, t = run.data.metrics, run.data.tags
        print(f"{t.get('stage', ''):<7} {t.get('model', ''):<26} {t.get('fold', ''):>4} "
              f"{m.get('val_log_loss', float('nan')):>12.4f} {m.get('val_accuracy', float('nan')):>8.3f} "
              f"{m.get('train_examples_per_s', float('nan')):>10.1f} {t.get('dagster_run_id', '')[:8]:<10} "
              f"{run.info.run_id[:12]}")
    return EXIT_OK


# ---------------------------------------------------------------- ui
def cmd_ui(args) -> int:
    from arena_pipeline.resources.tracking import MlflowTracking

    home = _ensure_instance()
    tracking = MlflowTracking(tracking_uri=os.environ.get("ARENA_MLFLOW_URI", ""))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    dagster = subprocess.Popen([str(bin_dir / "dagster-webserver"), "-w", str(REPO_ROOT / "workspace.yaml"),
                                "-h", "127.0.0.1", "-p", str(args.dagster_port)], cwd=REPO_ROOT, env=env)
    mlflow = subprocess.Popen([str(bin_dir / "mlflow"), "server", "--backend-store-uri", tracking.uri,
                               "--host", "127.0.0.1", "--port", str(args.mlflow_port)], cwd=home, env=env)
    print(f"Dagster UI: http://127.0.0.1:{args.dagster_port}\nMLflow UI:  http://127.0.0.1:{args.mlflow_port}\n"
          "Ctrl-C stops both.", flush=True)
    try:
        while dagster.poll() is None and mlflow.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in (dagster, mlflow):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (dagster, mlflow):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arena-pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole graph (raw files -> predictor bundle) on a profile")
    demo.add_argument("--profile", choices=sorted(PROFILES), default=os.environ.get("ARENA_PROFILE", "demo"))
    demo.add_argument("--job", default="full_pipeline_job", help="which job to run (default: everything)")
    demo.set_defaults(func=cmd_demo)

    predict = sub.add_parser("predict", help="score a CSV/parquet/JSONL file (Kaggle test.csv included)")
    predict.add_argument("--bundle", help="bundle folder (default: the local instance's latest bundle)")
    predict.add_argument("--input", required=True)
    predict.add_argument("--output", required=True, help=".csv (Kaggle submission), .parquet or .jsonl")
    predict.set_defaults(func=cmd_predict)

    evaluate = sub.add_parser("evaluate", help="log loss, accuracy, per-class loss and calibration of predictions")
    evaluate.add_argument("--predictions", required=True)
    evaluate.add_argument("--labels", required=True)
    evaluate.add_argument("--plots", help="folder for confusion-matrix and reliability PNGs")
    evaluate.set_defaults(func=cmd_evaluate)

    runs = sub.add_parser("runs", help="table of MLflow runs sorted by validation log loss")
    runs.add_argument("--stage")
    runs.add_argument("--model")
    runs.set_defaults(func=cmd_runs)

    ui = sub.add_parser("ui", help="start the Dagster UI and the MLflow UI on localhost")
    ui.add_argument("--dagster-port", type=int, default=3000)
    ui.add_argument("--mlflow-port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as err:
        print(f"arena-pipeline {args.command}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
