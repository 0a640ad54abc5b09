"""gpu_jobs.contract is the bottom of the import graph: no Dagster, no torch, neither package above it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_contract_imports_neither_dagster_nor_torch():
    code = ("import json, sys; import gpu_jobs.contract; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert "gpu_jobs" in loaded
    assert not loaded & {"dagster", "dagster_pipes", "torch", "transformers", "accelerate", "arena_pipeline"}


def test_contract_modules_import_nothing_from_the_packages_above():
    for path in (REPO / "gpu_jobs" / "contract").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                top = name.split(".")[0]
                assert top != "arena_pipeline", f"{path.name} imports {name}"
                assert top != "gpu_jobs" or name.startswith("gpu_jobs.contract"), f"{path.name} imports {name}"
