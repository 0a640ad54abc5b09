"""`arena-pipeline`: run the demo, score files with a bundle, evaluate predictions, list runs, start the UIs.

Exit codes: 0 success; 1 the pipeline or a job failed; 2 bad input (unknown command, option or value,
missing file or column, unknown bundle, invalid predictions, an output that would overwrite an input) —
reported as one line on stderr, nothing written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from arena_pipeline.profile import PROFILES, REPO_ROOT, dagster_home, get_profile

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class InputError(Exception):
    """Bad input from the user: one line, exit code 2."""


def _ensure_instance() -> Path:
    home = dagster_home()
    os.environ["DAGSTER_HOME"] = str(home)
    if not (home / "dagster.yaml").exists():
        shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    return home


OUTPUT_FORMATS = (".csv", ".parquet", ".jsonl", ".json")


def _write_table(frame, path: Path) -> None:
    from gpu_jobs.contract.atomic import atomic_path

    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        elif path.suffix in (".jsonl", ".json"):
            frame.to_json(tmp, orient="records", lines=True)
        else:
            frame.to_csv(tmp, index=False)


# ---------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    try:  # a shipped name or the path of a user's profile YAML, validated (members' overrides included) here
        profile = get_profile(args.profile)
    except ValueError as exc:
        raise InputError(f"--profile / ARENA_PROFILE={args.profile}: " + " | ".join(str(exc).splitlines())) from None
    os.environ["ARENA_PROFILE"] = profile.source
    home = _ensure_instance()
    import dagster as dg

    from arena_pipeline.definitions import build_definitions
    from arena_pipeline.partitions import fold_range_tags

    budget_s = profile.time_budget_s if args.time_budget is None else args.time_budget * 60
    if budget_s:
        from arena_pipeline.demo_sizing import fit_to_budget

        profile = fit_to_budget(profile, budget_s, log=lambda line: print(f"arena-pipeline: {line}", flush=True))
    defs = build_definitions(profile)
    job = defs.resolve_job_def(args.job)
    print(f"arena-pipeline: running {args.job} on profile '{profile.name}' (state in {home})", flush=True)
    if profile.differences:
        print(f"profile '{profile.name}' differs from '{profile.base}' in (everything else is '{profile.base}'):\n  "
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
    from arena_pipeline.bundle import (BundleError, load_manifest, training_tie_rate, quantize_mode, score_frame,
                                       submission_frame)
    from arena_pipeline.data.clean import clean_frame
    from arena_pipeline.data.load import read_table
    from arena_pipeline.data.schema import DataError
    from arena_pipeline.resources.storage import ArenaStorage, OverwriteError, refuse_overwrite

    bundle = Path(args.bundle) if args.bundle else ArenaStorage().bundle_dir
    if Path(args.output).suffix not in OUTPUT_FORMATS:
        raise InputError(f"--output {args.output}: unknown format; end the name with one of {', '.join(OUTPUT_FORMATS)}")
    if args.adapt_tie_prior and args.tie_rate is not None:
        raise InputError("--adapt-tie-prior and --tie-rate: give one (EM estimates the file's tie rate; --tie-rate "
                         "states it)")
    adapt = args.adapt_tie_prior or args.tie_rate is not None
    priors = Path(args.output).with_suffix(".priors.json")
    quant_report = Path(args.output).with_suffix(".quantization.json")
    try:
        refuse_overwrite([("--output", args.output)] + ([("priors report", priors)] if adapt else [])
                         + ([("quantization report", quant_report)] if args.quantize not in (None, "none") else []),
                         [("--input", args.input), ("--bundle", bundle)])
        manifest = load_manifest(bundle)
        quantize = quantize_mode(manifest, args.quantize)
        if quantize != "none":  # the bundle's own mode: its report must not overwrite an input either
            refuse_overwrite([("quantization report", quant_report)], [("--input", args.input), ("--bundle", bundle)])
        train_tie = training_tie_rate(manifest, bundle) if adapt else None
        raw = read_table(args.input)
        frame, _ = clean_frame(raw, file=str(args.input), labelled=False, dedupe=False)
    except (DataError, BundleError, OverwriteError) as err:
        raise InputError(str(err)) from None
    if frame.empty:
        import numpy as np

        _write_table(submission_frame(frame["id"], np.zeros((0, 3))), Path(args.output))
        print(f"{args.input}: header only, 0 rows scored -> {args.output}")
        return EXIT_OK
    start = time.time()
    from tqdm import tqdm

    bar = tqdm(desc="members x folds", unit="model", file=sys.stderr)
    records: dict = {}
    probs = score_frame(bundle, frame, progress=lambda key, fold: bar.update(1), quantize=quantize, records=records)
    bar.close()
    if quantize != "none":
        import json

        quant_report.write_text(json.dumps({"mode": quantize, "members": records}, indent=2) + "\n")
        methods = sorted({r["method"].split(" (")[0] for r in records.values()})
        print(f"quantize {quantize}: {', '.join(methods)} (report: {quant_report})")
    if adapt:
        import json

        from arena_pipeline.calibration import em_tie_prior, with_tie_prior

        if args.adapt_tie_prior:
            probs, report = em_tie_prior(probs, train_tie)
            said = f"by EM on {args.input}: {train_tie:.3f} (training) -> {report['tie_prior_estimated']:.3f} " \
                   f"{report['reason']}"
        else:
            probs = with_tie_prior(probs, train_tie, args.tie_rate)
            report = {"tie_prior_train": train_tie, "tie_prior_given": args.tie_rate, "rows": len(probs),
                      "mean_tie": float(probs[:, 2].mean())}
            said = f"of {args.input} as given: {train_tie:.3f} (training) -> {args.tie_rate:.3f}"
        priors.write_text(json.dumps(report, indent=2) + "\n")
        print(f"tie prior {said} (report: {priors})")
    wall = time.time() - start
    out = submission_frame(frame["id"], probs)
    _write_table(out, Path(args.output))
    print(f"wrote {len(out)} rows to {args.output} ({len(out) / max(wall, 1e-9):.1f} rows/s, {wall:.1f} s)")
    return EXIT_OK


# ---------------------------------------------------------------- evaluate
def cmd_evaluate(args) -> int:
    import numpy as np

    from arena_pipeline import blending as ens
    from arena_pipeline import plots
    from arena_pipeline.data.clean import clean_frame
    from arena_pipeline.data.folds import label_index
    from arena_pipeline.data.load import read_predictions, read_table
    from arena_pipeline.data.schema import DataError
    from arena_pipeline.resources.storage import OverwriteError, refuse_overwrite

    folder = Path(args.plots) if args.plots else None
    pngs = [folder / "confusion_matrix.png", folder / "reliability.png"] if folder else []
    try:
        refuse_overwrite([("--plots", png) for png in pngs],
                         [("--predictions", args.predictions), ("--labels", args.labels)])
        preds = read_predictions(args.predictions)
        labels_raw = read_table(args.labels)
        labels, _ = clean_frame(labels_raw, file=str(args.labels), labelled=True, dedupe=False)
    except (DataError, OverwriteError) as err:
        raise InputError(str(err)) from None
    preds = preds.set_index("id")
    missing = [i for i in labels["id"] if i not in preds.index]
    if missing:
        raise InputError(f"{args.predictions}: row id={missing[0]}: column 'id': no prediction for this labelled row "
                         f"({len(missing)} missing). Score every row of {args.labels}.")
    from gpu_jobs.contract.schema import LABEL_COLUMNS, PROB_COLUMNS

    columns = [c for c in PROB_COLUMNS if c in preds.columns] or list(LABEL_COLUMNS)
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
    if pngs:
        plots.confusion_matrix(y, p, pngs[0])
        plots.reliability_diagram(y, p, pngs[1])
        print(f"\nplots: {pngs[0]}, {pngs[1]}")
    return EXIT_OK


# ---------------------------------------------------------------- runs
STAGES = ("stage1", "stage2", "stage1_ensemble", "final_ensemble")  # the `stage` tag of job and ensemble runs
MODELS = tuple(sorted({m.name for p in PROFILES.values() for m in p.models})) + ("ensemble",)


def cmd_runs(args) -> int:
    from datetime import datetime

    from arena_pipeline.resources.tracking import MlflowTracking

    tracking = MlflowTracking(tracking_uri=os.environ.get("ARENA_MLFLOW_URI", ""))
    client = tracking.client()
    exp = client.get_experiment_by_name(tracking.experiment)
    if exp is None:
        print("no runs yet: run `arena-pipeline demo` first")
        return EXIT_OK
    filters = [f"tags.{key} = '{value}'" for key, value in (("stage", args.stage), ("model", args.model)) if value]
    runs = [run for kind in ("job", "ensemble") for run in client.search_runs(
        [exp.experiment_id], filter_string=" and ".join([f"tags.kind = '{kind}'", *filters]), max_results=1000)]
    if not runs:
        print(f"no runs match {' '.join(filters) or 'in ' + tracking.uri}")
        return EXIT_OK

    def loss(run):  # an ensemble's validation loss is its cross-validated blend loss
        m = run.data.metrics
        return m.get("val_log_loss", m.get("fitted_blend_log_loss_cv", float("inf")))

    print(f"{'stage':<15} {'model':<26} {'fold':>4} {'val_log_loss':>12} {'val_acc':>8} {'train_ex/s':>10} "
          f"{'status':<8} {'start':<19} {'dagster_run':<36} mlflow_run")
    for run in sorted(runs, key=loss):
        m, t = run.data.metrics, run.data.tags
        acc = m.get("val_accuracy", m.get("fitted_blend_accuracy", float("nan")))
        fold = "all" if t.get("fold") == "-1" else t.get("fold", "")
        start = datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%dT%H:%M:%S")
        print(f"{t.get('stage', ''):<15} {t.get('model', ''):<26} {fold:>4} {loss(run):>12.4f} {acc:>8.3f} "
              f"{m.get('train_examples_per_s', float('nan')):>10.1f} {run.info.status:<8} {start:<19} "
              f"{t.get('dagster_run_id', ''):<36} {tracking.run_link(exp.experiment_id, run.info.run_id)}")
    return EXIT_OK


# ---------------------------------------------------------------- ui
def cmd_ui(args) -> int:
    from arena_pipeline import ui

    home = _ensure_instance()
    return ui.serve(home, os.environ.get("ARENA_MLFLOW_URI", ""), args.dagster_port, args.mlflow_port)


class _Parser(argparse.ArgumentParser):
    """Usage errors (unknown command, value or option) are bad input: one line on stderr, exit 2."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _command(sub, name: str, summary: str, description: str, examples: str, exits: str) -> argparse.ArgumentParser:
    """A sub-command whose --help shows what it does, examples and its exit codes."""
    epilog = f"examples:\n{examples}\n\nexit codes:\n  0  success\n{exits}"
    return sub.add_parser(name, help=summary, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _minutes(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more minutes, got {value}")
    return value


def _tie_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from arena_pipeline.jobs import JOBS

    parser = _Parser(prog="arena-pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="`arena-pipeline COMMAND --help` shows a command's options, allowed values, examples "
                            "and exit codes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,predict,evaluate,runs,ui}")

    jobs = "\n".join(f"  {name:<18} {text}" for name, text in JOBS.items())
    demo = _command(sub, "demo", "run the whole graph (raw files -> predictor bundle) on a profile",
                    "Run one Dagster job in this process on a profile, print the wall time of each asset, the final "
                    "log loss next to\nthe best single member and the class prior, and where the bundle is. State "
                    f"goes to $DAGSTER_HOME.\n\njobs:\n{jobs}",
                    "  arena-pipeline demo                          # demo profile, every asset but the evaluation\n"
                    "  arena-pipeline demo --profile smoke          # the test-suite sizes, a minute or two on 2 cores",
                    "  1  the run failed (the failing step is named above; `arena-pipeline ui` shows it)\n"
                    "  2  unknown --profile or --job: one line on stderr")
    demo.add_argument("--profile", default=os.environ.get("ARENA_PROFILE", "demo"), metavar="PROFILE",
                      help=f"sizes and models: one of {', '.join(PROFILES)} or the path of your own profile YAML "
                           "(default: $ARENA_PROFILE, else demo)")
    demo.add_argument("--job", choices=list(JOBS), default="full_pipeline_job", metavar="JOB",
                      help="one of: %(choices)s (default: %(default)s; see jobs above)")
    demo.add_argument("--time-budget", type=_minutes, default=None, metavar="MINUTES",
                      help="size the neural members to finish in about this many minutes on this CPU, from a short "
                           "throughput probe (default: the profile's own budget, 20 for demo; 0: run the profile "
                           "as is)")
    demo.set_defaults(func=cmd_demo)

    predict = _command(sub, "predict", "score a CSV/parquet/JSONL file (Kaggle test.csv included)",
                       "Score every row of a pair file (id, prompt, response_a, response_b) with a predictor bundle; "
                       "write id,\nwinner_model_a, winner_model_b, winner_tie. A header-only input gives a header-only "
                       "output. The output may\nnot be an input (the same file under any name: symlink, hard link, "
                       "./x) nor lie inside the bundle.",
                       "  arena-pipeline predict --input test.csv --output submission.csv\n"
                       "  arena-pipeline predict --bundle path/to/bundle --input pairs.parquet --output scores.parquet",
                       "  2  bad input, one line on stderr, nothing written: missing file or column, not a bundle,\n"
                       "     output that is an input, unknown output format")
    predict.add_argument("--bundle", metavar="DIR", help="bundle folder (default: the local instance's latest bundle)")
    predict.add_argument("--input", required=True, metavar="FILE", help=".csv, .parquet, .jsonl or a saved HF dataset")
    predict.add_argument("--output", required=True, metavar="FILE",
                         help=f"{', '.join(OUTPUT_FORMATS)} (.csv is the Kaggle submission layout)")
    predict.add_argument("--adapt-tie-prior", action="store_true",
                         help="re-estimate the file's tie rate by EM on the bundle's own probabilities (A/B kept even; "
                              "needs >= 100 rows) and write the estimate to OUTPUT.priors.json")
    predict.add_argument("--tie-rate", type=_tie_rate, default=None, metavar="RATE",
                         help="the tie rate of your labels, when their protocol fixes it (e.g. 0.3 for Chatbot Arena "
                              "votes; 0: they cannot be ties): the bundle's tie prior moves from its training rate to "
                              "RATE by Bayes' rule (A/B kept even); written to OUTPUT.priors.json. A file's "
                              "ties_possible=false column does the same as 0, row by row")
    predict.add_argument("--quantize", choices=("none", "int8", "int4"), default=None,
                         help="score the members quantised: int8 = dynamic int8 for encoders on a CPU, "
                              "bitsandbytes 8-bit decoders on CUDA; int4 = bitsandbytes NF4 decoders on CUDA (CPU: "
                              "int8). Default: the bundle's own mode (bundle.json 'quantization', else none). How each "
                              "member was quantised goes to OUTPUT.quantization.json")
    predict.set_defaults(func=cmd_predict)

    evaluate = _command(sub, "evaluate", "log loss, accuracy, per-class loss and calibration of predictions",
                        "Compare a prediction file (id + winner_model_a/b/tie or p_a/p_b/p_tie) with labelled pairs: "
                        "rows, log loss,\naccuracy, per-class loss, class-prior log loss and a calibration table; "
                        "optionally confusion_matrix.png and\nreliability.png in a folder (refused when one of them "
                        "would overwrite an input).",
                        "  arena-pipeline evaluate --predictions submission.csv --labels labels.csv\n"
                        "  arena-pipeline evaluate --predictions submission.csv --labels labels.csv --plots plots/",
                        "  2  bad input, one line on stderr, nothing written: missing file or column, a labelled id "
                        "without\n     prediction, probabilities not finite / not summing to 1, plots over an input")
    evaluate.add_argument("--predictions", required=True, metavar="FILE")
    evaluate.add_argument("--labels", required=True, metavar="FILE", help="pairs with winner_model_a/b/tie")
    evaluate.add_argument("--plots", metavar="DIR", help="folder for confusion_matrix.png and reliability.png")
    evaluate.set_defaults(func=cmd_evaluate)

    runs = _command(sub, "runs", "table of MLflow runs (jobs and ensembles) sorted by validation log loss",
                    "List the MLflow runs of training jobs and ensemble fits, best validation log loss first (an "
                    "ensemble's is its\ncross-validated blend loss). Columns: stage, model, fold (all = an ensemble "
                    "over the folds), val_log_loss,\nval_acc, train_ex/s, status, start (local time), the full Dagster "
                    "run id and the MLflow UI link of the run\n(`arena-pipeline ui` serves it). The store is "
                    "$DAGSTER_HOME/mlflow/mlflow.db unless $ARENA_MLFLOW_URI is set.",
                    "  arena-pipeline runs\n  arena-pipeline runs --stage stage1\n"
                    "  arena-pipeline runs --model ensemble",
                    "  2  unknown --stage or --model: one line on stderr")
    runs.add_argument("--stage", choices=STAGES, help="one of: %(choices)s")
    runs.add_argument("--model", choices=MODELS, metavar="MODEL", help="one of: %(choices)s")
    runs.set_defaults(func=cmd_runs)

    ui = _command(sub, "ui", "start the Dagster UI and the MLflow UI on localhost",
                  "Start the Dagster UI and the MLflow UI on 127.0.0.1; Ctrl-C stops both.",
                  "  arena-pipeline ui\n  arena-pipeline ui --dagster-port 3001 --mlflow-port 5001",
                  "  2  bad option value: one line on stderr")
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
