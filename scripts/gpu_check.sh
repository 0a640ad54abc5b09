#!/usr/bin/env bash
# The `rehearsal` members on one CUDA GPU: CUDA, bf16, bitsandbytes' real 4-bit CUDA kernels, paged AdamW
# 8-bit, the attention implementation transformers picks; prints per member the wall time, peak GPU memory
# and examples/s. Target: under 10 minutes on one A100/H100 (tiny models; most of the time is start-up).
#
#     bash scripts/gpu_check.sh                  # uses .venv/bin/python; PY=... to use another interpreter
#     OUT=/tmp/gpu_check bash scripts/gpu_check.sh
#
# Needs a CUDA build of torch and the `gpu` extra (pip install -e .[gpu]); no model hub (tiny:* models are
# built locally). Fails fast, with one line saying why, when there is no CUDA device, no bf16 or no working
# bitsandbytes CUDA 4-bit kernel. GPU_CHECK_SELF_TEST=1 runs steps 2-3 on the CPU (no preflight, no
# GPU memory) to test this script itself on a machine without a GPU. NOTE: written and checked on a CPU machine only; it has not yet been run
# on a GPU (README, "GPUs and clusters").
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PY:-$ROOT/.venv/bin/python}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
unset DAGSTER_PIPES_CONTEXT DAGSTER_PIPES_MESSAGES

SELF_TEST=${GPU_CHECK_SELF_TEST:-0}
DEVICE=cuda ACCELERATE_CONFIG=gpu_jobs/accelerate_configs/gpu_1.yaml
[ "$SELF_TEST" = 1 ] && DEVICE=cpu ACCELERATE_CONFIG=gpu_jobs/accelerate_configs/cpu_single.yaml

die() { echo "gpu_check: FAILED: $*" >&2; exit 1; }
[ -x "$PY" ] || die "no Python at $PY (make install, or PY=/path/to/python)"
if [ "$SELF_TEST" != 1 ]; then
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this check needs an NVIDIA GPU and its driver"

# ---- 1. preflight (seconds): CUDA, bf16, a real NF4 + double-quant 4-bit matmul on the GPU, paged AdamW 8-bit
"$PY" - <<'EOF' || die "preflight (see the line above)"
import sys
import torch

def fail(msg):
    print(f"gpu_check: {msg}", file=sys.stderr)
    sys.exit(1)

if not torch.cuda.is_available():
    fail(f"torch {torch.__version__} sees no CUDA device (built for CUDA {torch.version.cuda}); install a CUDA "
         "build of torch and check CUDA_VISIBLE_DEVICES / the driver (nvidia-smi)")
if not torch.cuda.is_bf16_supported():
    fail(f"{torch.cuda.get_device_name(0)} has no bf16 (needs compute capability >= 8.0, e.g. A100/H100)")
import bitsandbytes as bnb

torch.manual_seed(0)
layer = torch.nn.Linear(512, 256, bias=False, dtype=torch.bfloat16)
q = bnb.nn.Linear4bit(512, 256, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
q.weight = bnb.nn.Params4bit(layer.weight.data.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4")
q = q.cuda()  # quantises on the GPU
x = torch.randn(8, 512, dtype=torch.bfloat16, device="cuda")
ref = layer.cuda()(x)
err = ((q(x) - ref).float().norm() / ref.float().norm()).item()
state = q.weight.quant_state
if not (state.quant_type == "nf4" and state.nested and err < 0.2):
    fail(f"bitsandbytes {bnb.__version__} 4-bit check failed: quant_type {state.quant_type}, nested {state.nested}, "
         f"relative error {err:.3f}")
p = torch.nn.Parameter(torch.randn(4096, 4, device="cuda"))
opt = bnb.optim.PagedAdamW8bit([p], lr=1e-3)
p.grad = torch.randn_like(p)
opt.step()
cap = torch.cuda.get_device_capability(0)
print(f"gpu_check: {torch.cuda.get_device_name(0)} (sm_{cap[0]}{cap[1]}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB), torch {torch.__version__} CUDA "
      f"{torch.version.cuda}, bitsandbytes {bnb.__version__}: NF4 + double quant matmul rel. error {err:.3f}, "
      f"PagedAdamW8bit step ok")
EOF
fi

# ---- 2. data (400 labelled rows in four folds, 512 rows to predict) and the tiny models; attention implementations
"$PY" - "$OUT" "$DEVICE" <<'EOF' || die "data / model preparation"
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from arena_pipeline.profile import REHEARSAL, SHIPPED
from gpu_jobs.models.registry import family_of

out, device = Path(sys.argv[1]), torch.device(sys.argv[2])
pairs = pd.read_parquet(SHIPPED / "arena_bench_pairs.parquet").sample(912, random_state=0).reset_index(drop=True)
pairs.head(400).assign(fold=np.arange(400) % 4).to_parquet(out / "train.parquet")
pairs.tail(512).drop(columns=["winner_model_a", "winner_model_b", "winner_tie"]).to_parquet(out / "predict.parquet")
for spec in REHEARSAL.models:
    if not spec.family.neural:
        continue
    cfg = spec.job_config()
    model, _ = family_of(cfg).build(cfg, device=device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    print(f"gpu_check: {spec.name} ({cfg.model_name}): attention '{base.config._attn_implementation}', "
          f"4-bit {bool(getattr(base, 'is_loaded_in_4bit', False))}, "
          f"device {next(base.parameters()).device}")
    del model, base
    if device.type == "cuda":
        torch.cuda.empty_cache()
EOF

# ---- 3. each member: one fold of the training job exactly as Dagster launches it, on one GPU
args_for() {  # the rehearsal profile's arguments for member $1 (the same job_args the asset passes)
  "$PY" - "$1" "$OUT" <<'EOF'
import sys
from pathlib import Path

from arena_pipeline.assets.oof import job_args
from arena_pipeline.profile import REHEARSAL

name, out = sys.argv[1], Path(sys.argv[2])
print("\n".join(job_args(REHEARSAL.model(name), 0, out / "train.parquet", out / name) +
                ["--predict", f"test={out / 'predict.parquet'}"]))
EOF
}

peak_mib() {  # poll the device's used memory every 200 ms into $1 until killed
  [ "$SELF_TEST" = 1 ] && { : > "$1"; exec sleep 100000; }
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 200 > "$1" 2>/dev/null
}

MEMBERS=${MEMBERS:-"features cross_encoder_deberta_v3 llm_gemma2_9b_qlora llm_llama3_8b_qlora"}
printf '%-28s %8s %14s %12s %14s %9s %8s\n' member wall_s peak_gpu_MiB train_ex/s predict_ex/s steps val_ll \
  > "$OUT/summary.txt"
for member in $MEMBERS; do
  mapfile -t ARGS < <(args_for "$member")
  log="$OUT/$member.log"
  peak_mib "$OUT/$member.mem" & poller=$!
  start=$(date +%s.%N)
  set +e
  timeout "$STEP_TIMEOUT" "$PY" -m accelerate.commands.launch \
    --config_file "$ACCELERATE_CONFIG" -m gpu_jobs.train "${ARGS[@]}" > "$log" 2>&1
  rc=$?
  set -e
  end=$(date +%s.%N)
  kill "$poller" 2>/dev/null || true
  wait "$poller" 2>/dev/null || true
  if [ "$rc" -ne 0 ]; then tail -30 "$log" >&2; die "$member exited with $rc (log: $log)"; fi
  if [ "$DEVICE" = cuda ] && grep -q "paged_adamw_8bit: bitsandbytes pages optimizer state only on CUDA" "$log"; then
    die "$member fell back from paged AdamW 8-bit on a CUDA machine (log: $log)"
  fi
  "$PY" - "$OUT/$member/metrics.json" "$OUT/$member.mem" "$member" "$start" "$end" <<'EOF' | tee -a "$OUT/summary.txt"
import json
import sys

metrics_path, mem_path, member, start, end = sys.argv[1:6]
m = json.load(open(metrics_path))
used = [int(line) for line in open(mem_path).read().split() if line.strip().isdigit()]
peak = max(used) if used else -1
print(f"{member:<28} {float(end) - float(start):8.1f} {peak:14d} {m['train_examples_per_s']:12.1f} "
      f"{m['predict_examples_per_s']:14.1f} {m['n_steps']:9d} {m['val_log_loss']:8.4f}")
EOF
  grep -h -E "^(precision|  bf16|  compute_dtype|  optimizer|  precision)" "$OUT/$member/model/config.yaml" 2>/dev/null \
    | tr -s ' ' | paste -sd ' ' | sed "s/^/gpu_check: $member resolved: /" || true
done

echo
echo "gpu_check: per member (wall_s includes process start-up and model build; peak_gpu_MiB is nvidia-smi's"
echo "           device-wide memory.used, CUDA context included; all rows of one fold, rehearsal sizes)"
cat "$OUT/summary.txt"
echo "gpu_check: OK; logs, metrics and models in $OUT"
