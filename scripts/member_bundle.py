"""Pack one trained member's fold models as a predictor bundle (weight 1, temperature 1), for scale tests of
`arena-pipeline predict` when the rest of the graph has not run (e.g. only `stage1_oof_features`).

    DAGSTER_HOME=/tmp/k .venv/bin/python scripts/member_bundle.py --stage stage1 --model features \
        --folds 0 1 2 3 --out /tmp/k/member_bundle
    .venv/bin/arena-pipeline predict --bundle /tmp/k/member_bundle --input test.csv --output submission.csv

The bundle has the layout and arithmetic of the pipeline's own (`arena_pipeline/bundle.py`): the member's
folds are averaged; there is no blend to fit, so this is not the pipeline's final predictor.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from arena_pipeline.bundle import write_bundle
from arena_pipeline.resources.storage import ArenaStorage


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", default="stage1")
    p.add_argument("--model", required=True)
    p.add_argument("--folds", type=int, nargs="+", required=True)
    p.add_argument("--out", required=True, help="bundle folder to write")
    args = p.parse_args(argv)
    storage = ArenaStorage()
    dirs = {(args.stage, args.model, k): storage.job_dir(args.stage, args.model, k) / "model" for k in args.folds}
    missing = [str(d) for d in dirs.values() if not (d / "config.yaml").exists()]
    if missing:
        print(f"member_bundle: no trained model at {missing}; materialise {args.stage}_oof_{args.model} first",
              file=sys.stderr)
        return 2
    name = f"{args.stage}/{args.model}"
    spec = {"members": [{"name": name, "stage": args.stage, "model": args.model, "tta": False}],
            "weights": {name: 1.0}, "temperature": 1.0, "folds": args.folds}
    bundle = write_bundle(Path(args.out), spec, dirs, {"profile": f"one member: {name}"})
    print(json.dumps({"bundle": str(bundle), "member": name, "folds": args.folds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
