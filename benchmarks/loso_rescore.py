"""Re-score a finished leave-one-source-out evaluation with the current calibration maps, without retraining.

`evaluation_job` trains every stage-1 member once per held-out source (minutes to hours); the calibration maps
(`arena_pipeline.calibration`) and the blend arithmetic take a second. This reads the LOSO jobs' saved
predictions and the stage-1 ensemble from a Dagster home and prints the same tables `loso_evaluation`
writes (the same functions: `held_out_predictions`, `stage1_fit_rows`, `loso_report`, `report_markdown`).

    DAGSTER_HOME=.dagster_home ARENA_PROFILE=demo .venv/bin/python benchmarks/loso_rescore.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arena_pipeline.assets.evaluation import (held_out_predictions, loso_report, loso_split,  # noqa: E402
                                              report_markdown, stage1_fit_rows)
from arena_pipeline.profile import dagster_home, get_profile  # noqa: E402
from arena_pipeline.resources.storage import ArenaStorage  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", default="", help="the arena folder of a Dagster home (default: $DAGSTER_HOME/arena)")
    ap.add_argument("--profile", default=None, help="profile name (default: $ARENA_PROFILE)")
    ap.add_argument("--sources", nargs="+", default=["pandalm_testset_v1", "llmbar"])
    ap.add_argument("--models", nargs="+", default=None,
                    help="read only these members' LOSO predictions (default: every member of the profile); the "
                         "bundle rows need every member with a stage-1 weight > 0")
    args = ap.parse_args()
    storage = ArenaStorage(home=args.home or str(dagster_home() / "arena"))
    profile = get_profile(args.profile)
    processed = pd.read_parquet(storage.data("processed_folds"))
    held_out = {s: held_out_predictions(storage, profile, loso_split(processed, s), s, args.models)
                for s in args.sources}
    with tempfile.TemporaryDirectory() as plots:
        results, _ = loso_report(held_out, stage1_fit_rows(storage, profile, processed), Path(plots))
    print(report_markdown(results))


if __name__ == "__main__":
    main()
