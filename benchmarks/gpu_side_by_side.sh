#!/usr/bin/env bash
# The GPU side-by-side of falqon (the default rule), falqon_paper (the paper's rule), fp8_lora,
# qlora, lora and full: one script, at most about 8 minutes on one H100/H200 (every phase has
# a hard timeout and the last phase gets only what is left of TOTAL_BUDGET; rows are
# written as they finish, so a phase cut short still leaves the rows it completed).
#
#   bash benchmarks/gpu_side_by_side.sh       # results in $OUT, or ./bench_out if unset
#
# Needs jax (CUDA build), flax and optax; the package is used from the checkout
# (PYTHONPATH=., no pip install). Phases, in order:
#   0. gpu   compile-only check, before the GPU is touched: every method's LLaMA-7B train
#            step (batch 4 x 2048, remat, rank 64) compiled for a
#            compile-only COMPILE_TARGET (default h100) on both GEMM back ends (cuBLASLt,
#            Triton), as the GPU's autotuner may pick either. A method that fails to compile
#            is dropped from the timed phases (said in the log) instead of failing there.
#   1. hlo   LLaMA-7B linear shapes 4096x4096, 11008x4096, 8192 tokens, rank 64 (compile
#            only: compiled FP8 GEMM / cast counts and memory on the GPU; HLO text dumped)
#   2. speed the same linear shapes (median of 10 steps after 3 warm-up steps)
#   3. speed a LLaMA-7B-shaped model, MODEL_LAYERS decoder layers (default 32: the full
#            7B), batch 4 x 2048 tokens, rank 64, gradient checkpointing (--remat), synthetic
#            weights; one process per method, each with its own timeout
#   4. hlo   a 2-layer LLaMA-7B-shaped model, batch 4 x 2048 (compile only), in whatever
#            is left of TOTAL_BUDGET (skipped when under 20 s remain)
# Environment overrides: OUT, MODEL_LAYERS, MODEL_TIMEOUT (seconds per method in phase 3),
# TOTAL_BUDGET (seconds, default 480), COMPILE_TARGET (default h100), METHODS (default
# falqon,falqon_paper,fp8_lora,qlora,lora,full), PYTHON (default: python, else python3).
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./bench_out}"
MODEL_LAYERS="${MODEL_LAYERS:-32}"
MODEL_TIMEOUT="${MODEL_TIMEOUT:-50}"
TOTAL_BUDGET="${TOTAL_BUDGET:-480}"
COMPILE_TARGET="${COMPILE_TARGET:-h100}"
METHODS="${METHODS:-falqon,falqon_paper,fp8_lora,qlora,lora,full}"
mkdir -p "$OUT"
LOG="$OUT/gpu_side_by_side.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
BENCH=("$PYTHON" -m falqon_jax.bench)
START=$SECONDS

phase() {  # phase SECONDS NAME -- COMMAND...
  local limit=$1 name=$2
  shift 3
  echo
  echo "=== $name (timeout ${limit}s, t=$((SECONDS - START))s) ==="
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "!!! $name: stopped by its ${limit}s timeout; rows finished before that are kept"
  elif [ "$rc" -ne 0 ]; then
    echo "!!! $name: exit status $rc"
  fi
}

echo "=== falqon-jax GPU side-by-side ==="
date -u '+%Y-%m-%d %H:%M:%S UTC'
echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  "$(git status --porcelain 2>/dev/null | grep -q . && echo '(with local changes)')"
timeout 30 nvidia-smi || echo "nvidia-smi not available"
timeout 30 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version \
  --format=csv || true
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores"
timeout 60 "$PYTHON" - <<'EOF' || echo "!!! could not import jax"
import platform
import jax, jaxlib
print(f"python {platform.python_version()}; jax {jax.__version__}; jaxlib {jaxlib.__version__}")
for name in ("flax", "optax"):
    try:
        print(name, __import__(name).__version__)
    except Exception as err:  # noqa: BLE001
        print(name, "unavailable:", err)
print("devices:", jax.devices(), "kind:", jax.devices()[0].device_kind)
EOF

phase 120 "0/4 compile-only check for ${COMPILE_TARGET} (no GPU used)" -- \
  env JAX_PLATFORMS=cpu "${BENCH[@]}" gpu --target "$COMPILE_TARGET" --methods "$METHODS" \
  --models llama-7b --shapes none --batch 4 --seq 2048 --fsdp 0 --json "$OUT/compile_check.json"
COMPILED=$(timeout 30 "$PYTHON" - "$OUT/compile_check.json" "$METHODS" <<'EOF'
import json, pathlib, sys
path, wanted = pathlib.Path(sys.argv[1]), sys.argv[2].split(",")
rows = json.loads(path.read_text()) if path.exists() else []
failed = {r["method"] for r in rows if "error" in r}
checked = {r["method"] for r in rows if r.get("kind") == "model"}
for method in wanted:
    if method in failed:
        print(f"!!! {method}: does not compile (see compile_check.json); dropped", file=sys.stderr)
    elif method not in checked:
        print(f"!!! {method}: not checked (check cut short); kept", file=sys.stderr)
print(",".join(m for m in wanted if m not in failed))
EOF
)
if [ -z "$COMPILED" ]; then
  echo "!!! no method passed the compile check; nothing to time"
  exit 1
fi
echo "methods to time: $COMPILED"

phase 45 "1/4 hlo: linear layers (GPU compile)" -- \
  "${BENCH[@]}" hlo --model-card none --methods "$COMPILED" \
  --json "$OUT/hlo_linear_gpu.json" --dump-hlo "$OUT/hlo_dump"

phase 45 "2/4 speed: linear layers" -- \
  "${BENCH[@]}" speed --model-card none --methods "$COMPILED" --repeats 10 --warmup 3 \
  --json "$OUT/speed_linear_gpu.json"

for method in ${COMPILED//,/ }; do
  phase "$MODEL_TIMEOUT" "3/4 speed: llama-7b x${MODEL_LAYERS} layers, $method" -- \
    "${BENCH[@]}" speed --shapes none --model-card llama-7b --model-layers "$MODEL_LAYERS" \
    --batch 4 --seq 2048 --remat --methods "$method" --repeats 3 --warmup 2 \
    --json "$OUT/speed_llama7b_${MODEL_LAYERS}L_${method}_gpu.json"
done

LEFT=$((TOTAL_BUDGET - (SECONDS - START)))
if [ "$LEFT" -ge 20 ]; then
  phase "$LEFT" "4/4 hlo: llama-7b x2 layers (GPU compile)" -- \
    "${BENCH[@]}" hlo --shapes none --model-card llama-7b --model-layers 2 \
    --batch 4 --seq 2048 --methods "$COMPILED" \
    --json "$OUT/hlo_llama7b_2L_gpu.json"
else
  echo "=== 4/4 hlo: llama-7b x2 layers: skipped, only ${LEFT}s of the budget left ==="
fi

echo
echo "=== collecting rows into $OUT/all_rows_gpu.json ==="
timeout 30 "$PYTHON" - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = []
for path in sorted(out.glob("*_gpu.json")):
    if path.name == "all_rows_gpu.json":
        continue
    for row in json.loads(path.read_text()):
        row["file"] = path.name
        rows.append(row)
(out / "all_rows_gpu.json").write_text(json.dumps(rows, indent=1) + "\n")
print(f"{len(rows)} rows")
EOF
echo "total wall time: $((SECONDS - START))s"
date -u '+%Y-%m-%d %H:%M:%S UTC'
