"""Tiny stand-in job programs for the launcher tests (run as `python -m arena_pipeline_tests.resources.fake_jobs`)."""

import os
import subprocess
import sys
import time


def main() -> None:
    mode = sys.argv[1]
    if mode == "fail":
        print("about to fail", flush=True)
        for i in range(60):
            print(f"noise line {i}", file=sys.stderr)
        print("ValueError: the real cause is here", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "report":
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            pipes.log.info("hello from the job")
            print("progress line on stdout", flush=True)
            pipes.report_asset_materialization(metadata={"val_log_loss": 0.95, "n_val": 12})
        return
    if mode == "steps":
        # reports two training steps, then waits for the test to create the file argv[2] (it checks MLflow meanwhile)
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            for step in (1, 2):
                pipes.report_custom_message({"kind": "step", "step": step, "loss": 1.0 / step, "lr": 1e-4})
            deadline = time.time() + 120
            while not os.path.exists(sys.argv[2]) and time.time() < deadline:
                time.sleep(0.2)
            pipes.report_asset_materialization(metadata={"val_log_loss": 0.9})
        return
    if mode == "tree":
        # a job that starts a grandchild, records both pids, then waits forever (for the cancel test)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(sys.argv[2], "w") as handle:
            handle.write(f"{os.getpid()} {child.pid}\n")
        time.sleep(600)
    if mode == "oom":
        os.kill(os.getpid(), 9)


if __name__ == "__main__":
    main()
