#!/usr/bin/env bash
# One-shot GPU check: `gradalign bench scoring` at a larger size (issue 3) and its scaling study at the 0.5B and
# 1.5B presets within a memory budget (issue 19), the torch trainer's GRPO
# step (scripts/check_trainer_step.py) and, where vLLM is installed, the vllm rollout backend
# (scripts/check_vllm.py) on a lent GPU (issue 13). GPU_CHECK_PARTS picks them (default: all three).
#
# On the device machine (run from the repository root, with the wheels of .whl carried):
#     bash scripts/gpu_check.sh
# Locally, a tiny CPU smoke test of this script (same code path, tiny model):
#     GPU_CHECK_DEVICE=cpu GPU_CHECK_DTYPE=float32 GPU_CHECK_PRESET= GPU_CHECK_GROUPS=2 GPU_CHECK_RESPONSES=4 \
#     GPU_CHECK_TOKENS=16 GPU_CHECK_MEMORY_BUDGET=1GiB GPU_CHECK_VALIDATION_GROUPS=2 OUT=/tmp/gpu-check \
#     bash scripts/gpu_check.sh
#
# The benchmark is run through gradalign_tools.bench.scoring.scoring_command, the function that
# `gradalign bench scoring` registers, wrapped by typer.run: gradalign_tools.cli itself imports the
# whole platform (pydantic, sqlalchemy, grpc health, ...), most of which the device's image lacks.
# Only structlog is missing there for this path; it travels as a wheel in .whl (git-ignored).
#
# Writes $OUT/$NAME.json, $OUT/$NAME.log, $OUT/trainer_step.{json,log}, $OUT/vllm.log and
# $OUT/nvidia_smi.csv (GPU samples every 5 s).

set -u
set -o pipefail

OUT="${OUT:-/tmp/gpu-check-out}"
NAME="${GPU_CHECK_NAME:-scoring_gpu}"     # output file stem
mkdir -p "$OUT"
PY="${GPU_CHECK_PYTHON:-python3}"

DEVICE="${GPU_CHECK_DEVICE:-cuda}"
DTYPE="${GPU_CHECK_DTYPE:-bfloat16}"
PRESET="${GPU_CHECK_PRESET-qwen2.5-0.5b}"     # empty: the command's default (tiny) model flags
GROUPS_="${GPU_CHECK_GROUPS:-16}"
RESPONSES="${GPU_CHECK_RESPONSES:-128}"
TOKENS="${GPU_CHECK_TOKENS:-512}"
VALIDATION_GROUPS="${GPU_CHECK_VALIDATION_GROUPS:-16}"
# Batches are planned within a memory budget (gradalign_common/memory_budget.py): a fraction of the
# GPU's memory by default. GPU_CHECK_MAX_BATCH_TOKENS (rows x width of one forward) overrides it, as
# the runs before the budget did (24576 at Qwen2.5-0.5B in bf16).
MEMORY_BUDGET="${GPU_CHECK_MEMORY_BUDGET:-0.8}"
MAX_BATCH_TOKENS="${GPU_CHECK_MAX_BATCH_TOKENS:-}"
METHODS="${GPU_CHECK_METHODS-project,top-layers}"   # empty: no approximate methods
MEMORY_MULTIPLIER="${GPU_CHECK_MEMORY_MULTIPLIER:-2}"
REPEATS="${GPU_CHECK_REPEATS:-1}"
BENCH_TIMEOUT="${GPU_CHECK_TIMEOUT:-430}"      # seconds; the benchmark is killed after this
PARTS="${GPU_CHECK_PARTS:-scoring,scaling,trainer,vllm}"
# the scaling part (issue 19): exact vs the floor at these group counts, per preset, with the fraction of
# the dense bf16 peak (989 TFLOP/s: an H200's) by 6 x parameters x response tokens per second
SCALING_PRESETS="${GPU_CHECK_SCALING_PRESETS:-qwen2.5-0.5b,qwen2.5-1.5b}"
SCALING_SIZES="${GPU_CHECK_SCALING_SIZES:-4,8}"
PEAK_TFLOPS="${GPU_CHECK_PEAK_TFLOPS:-989}"
SCALING_TIMEOUT="${GPU_CHECK_SCALING_TIMEOUT:-200}"   # seconds per preset
TRAINER_TIMEOUT="${GPU_CHECK_TRAINER_TIMEOUT:-180}"
VLLM_TIMEOUT="${GPU_CHECK_VLLM_TIMEOUT:-240}"

echo "== gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"

# (a) carried wheels -> /tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: wheel install failed"; exit 3; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed into /tmp/site: $(ls .whl)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# fewer fragmentation failures for batches of very different shapes (peak-allocation stats are unaffected)
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

# (b) the machine and the versions
SMI_PID=""
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,clocks.sm,power.draw --format=csv -l 5 \
    >"$OUT/nvidia_smi.csv" 2>&1 &
  SMI_PID=$!
fi
"$PY" - <<'EOF' || { echo "gpu_check: environment check failed"; exit 4; }
import platform, sys
import numpy, torch, transformers, typer, structlog
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm {p.major}.{p.minor}", p.multi_processor_count, "SMs")
print("transformers", transformers.__version__, "numpy", numpy.__version__, "typer", typer.__version__,
      "structlog", structlog.__version__)
EOF

# (c) the scoring benchmark
rc=0
if [[ ",$PARTS," == *",scoring,"* ]]; then
args=(--groups "$GROUPS_" --responses "$RESPONSES" --tokens "$TOKENS" --validation-groups "$VALIDATION_GROUPS"
      --device "$DEVICE" --dtype "$DTYPE" --memory-budget "$MEMORY_BUDGET" --methods "$METHODS"
      --memory-multiplier "$MEMORY_MULTIPLIER" --repeats "$REPEATS" --out "$OUT/$NAME.json")
if [ -n "$MAX_BATCH_TOKENS" ]; then args+=(--max-batch-tokens "$MAX_BATCH_TOKENS"); fi
if [ -n "$PRESET" ]; then args=(--preset "$PRESET" "${args[@]}"); fi
echo "== gradalign bench scoring ${args[*]}"
started=$(date +%s)
timeout -k 10 "$BENCH_TIMEOUT" "$PY" -c \
  'import typer; from gradalign_tools.bench.scoring import scoring_command; typer.run(scoring_command)' "${args[@]}" \
  2>&1 | tee "$OUT/$NAME.log"
rc=$?
echo "== benchmark exit status $rc after $(( $(date +%s) - started )) s (124: timed out after ${BENCH_TIMEOUT} s)" \
  | tee -a "$OUT/$NAME.log"
fi

# (c2) the scaling study within the memory budget, per preset: response tokens/s and fraction of peak
if [[ ",$PARTS," == *",scaling,"* ]]; then
  for preset in ${SCALING_PRESETS//,/ }; do
    sargs=(--preset "$preset" --responses "$RESPONSES" --tokens "$TOKENS" --validation-groups 2 --device "$DEVICE"
           --dtype "$DTYPE" --memory-budget "$MEMORY_BUDGET" --sizes "$SCALING_SIZES" --peak-tflops "$PEAK_TFLOPS"
           --out "$OUT/scaling_$preset.json")
    echo "== gradalign bench scoring ${sargs[*]}"
    timeout -k 10 "$SCALING_TIMEOUT" "$PY" -c \
      'import typer; from gradalign_tools.bench.scoring import scoring_command; typer.run(scoring_command)' "${sargs[@]}" \
      2>&1 | tee "$OUT/scaling_$preset.log"
    part=$?; echo "== scaling $preset exit status $part"; [ "$part" -eq 0 ] || rc=$part
  done
fi

# (d) the torch trainer's GRPO step: the same step on CPU and GPU, then one step at the preset's size
if [[ ",$PARTS," == *",trainer,"* ]]; then
  echo "== scripts/check_trainer_step.py --device $DEVICE --preset ${PRESET:-tiny} --dtype $DTYPE"
  timeout -k 10 "$TRAINER_TIMEOUT" "$PY" scripts/check_trainer_step.py --device "$DEVICE" --preset "${PRESET:-tiny}" \
    --dtype "$DTYPE" --out "$OUT/trainer_step.json" 2>&1 | tee "$OUT/trainer_step.log"
  part=$?; echo "== trainer step check exit status $part"; [ "$part" -eq 0 ] || rc=$part
fi

# (e) the vllm rollout backend, where vLLM is installed (the gpu extra)
if [[ ",$PARTS," == *",vllm,"* ]]; then
  if "$PY" -c "import vllm" >/dev/null 2>&1; then
    vargs=(--dtype "$DTYPE")
    if [ "$DEVICE" = "cpu" ]; then vargs+=(--enforce-eager); fi
    echo "== scripts/check_vllm.py ${vargs[*]}"
    timeout -k 10 "$VLLM_TIMEOUT" "$PY" scripts/check_vllm.py "${vargs[@]}" 2>&1 | tee "$OUT/vllm.log"
    part=$?; echo "== vllm check exit status $part"; [ "$part" -eq 0 ] || rc=$part
  else
    echo "== vllm check skipped: vllm is not importable here (install the gpu extra)" | tee "$OUT/vllm.log"
  fi
fi

if [ -n "$SMI_PID" ]; then
  kill "$SMI_PID" 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 | tee -a "$OUT/$NAME.log"
fi
exit "$rc"
