"""`arena-pipeline predict` vs its members' bare inference, on the same rows.

Prints the CLI's wall time and rows/s (process start-up included) next to the sum of the members' own
`gpu_jobs.predict.predict_frame` times on the same rows (models already loaded by nothing: each call
loads its model, as the CLI does). Target: the CLI adds at most 10% + 5 s.

    .venv/bin/python benchmarks/predict_overhead.py [--bundle DIR] [--rows 300]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    from arena_pipeline.resources.storage import ArenaStorage
    from gpu_jobs.predict import predict_frame

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="default: the local instance's bundle")
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--data", default=str(REPO / "data" / "shipped" / "pandalm_test.parquet"))
    args = parser.parse_args()
    from gpu_jobs.precision import hardware_summary

    print(hardware_summary(), flush=True)  # the figures below belong to this hardware

    bundle = Path(args.bundle) if args.bundle else ArenaStorage().bundle_dir
    manifest = json.loads((bundle / "bundle.json").read_text())
    rows = pd.read_parquet(args.data).head(args.rows)[["id", "prompt", "response_a", "response_b"]]
    with tempfile.TemporaryDirectory() as tmp:
        test = Path(tmp) / "test.csv"
        rows.to_csv(test, index=False)
        start = time.time()
        subprocess.run([sys.executable, "-m", "arena_pipeline.cli", "predict", "--bundle", str(bundle),
                        "--input", str(test), "--output", str(Path(tmp) / "sub.csv")], check=True, cwd=REPO)
        cli_s = time.time() - start

    weights = {n: w for n, w in manifest["weights"].items() if w > 0}
    members = [m for m in manifest["members"] if m["name"] in weights]
    bare = {}
    for key, folds in sorted(manifest["models"].items()):
        tta = any(f"{m['stage']}/{m['model']}" == key and m["tta"] for m in members)
        for fold, rel in sorted(folds.items()):
            start = time.time()
            predict_frame(bundle / rel, rows, tta=tta)
            bare[f"{key}/fold{fold}"] = time.time() - start
    bare_s = sum(bare.values())
    print(f"rows: {len(rows)}  bundle: {bundle}")
    for name, seconds in bare.items():
        print(f"  member {name:<45} {seconds:7.1f} s")
    print(f"members' bare inference (sum): {bare_s:7.1f} s  ({len(rows) / bare_s:.1f} rows/s)")
    print(f"arena-pipeline predict (CLI):  {cli_s:7.1f} s  ({len(rows) / cli_s:.1f} rows/s)")
    budget = 1.10 * bare_s + 5
    print(f"overhead: {cli_s - bare_s:+.1f} s ({(cli_s / bare_s - 1) * 100:+.1f}%); target <= 10% + 5 s "
          f"(<= {budget:.1f} s): {'met' if cli_s <= budget else 'NOT met'}")


if __name__ == "__main__":
    main()
