#!/usr/bin/env bash
# The GPU run of issue 6, on the device machine (one H200): exactness tests, then `tunesmith bench` for
# 1.8b LoRA (sanity), 7B LoRA, 7B QLoRA and the QLoRA longest-sequence search, in about 9 minutes.
# Every bench first runs one untimed warm-up pass, then per variant 3 untimed + 6-8 timed steps (median), and
# times the baseline again at the end (drift).
#
# The lead runs it from the repository root, with the wheels of /work/shared/wheels/gpu/*.whl copied into
# an ignored `.whl/` folder of the checkout (`echo /.whl/ >> .git/info/exclude`), carry [".whl"]:
#     bash bench/gpu_suite.sh            # everything (stages below, each with its own time limit)
#     bash bench/gpu_suite.sh lora qlora # only some stages: tests lora18 lora qlora longest
#     LORA_VARIANTS="baseline,tunesmith+compile" bash bench/gpu_suite.sh lora   # only some variants
# Output: $OUT/suite.log (all of it), $OUT/pytest_gpu.log, $OUT/*.json (one per bench); the result tables
# are printed last.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-/tmp/tunesmith_bench_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/suite.log") 2>&1
START=$SECONDS
TOTAL=${SUITE_SECONDS:-555}
left() { echo $(( TOTAL - (SECONDS - START) )); }
PY=python3

echo "== setup $(date -u +%H:%M:%S)"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "wheel install failed"
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no .whl/ folder: liger-kernel / bitsandbytes / pydantic must already be installed"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader || true
$PY - <<'PYEOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for m in ("transformers", "peft", "bitsandbytes", "liger_kernel", "triton", "pydantic", "typer"):
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__, e)
PYEOF

STAGES=${*:-tests lora18 lora qlora longest}
S7=internlm-7b; S18=1.8b; SEQ=2048; LMAX=65536
STEPS="--steps 8 --warmup 3"; STEPS18="--steps 6 --warmup 3"
if [ "${SUITE_SMOKE:-0}" = 1 ]; then  # plumbing check on a CPU box: tiny shapes, few steps
  S7=tiny; S18=tiny; SEQ=128; LMAX=512; STEPS="--steps 2 --warmup 1"; STEPS18=$STEPS
fi
bench() {  # bench NAME SECONDS args...
  local name=$1 secs=$2; shift 2
  local l; l=$(left)
  if (( l < 40 )); then echo "== $name: skipped, $l s left"; return; fi
  (( secs > l - 10 )) && secs=$(( l - 10 ))
  echo "== $name ($secs s) $(date -u +%H:%M:%S)"
  timeout -k 10 $(( secs + 15 )) $PY -m tunesmith.bench --time-budget "$secs" --json "$OUT/$name.json" "$@" \
    || echo "== $name exited with $?"
}

for stage in $STAGES; do
  case $stage in
    tests)
      echo "== gpu exactness tests $(date -u +%H:%M:%S)"
      timeout -k 5 ${TESTS_SECONDS:-90} $PY -m pytest -m gpu ${TESTS_PATH:-tests/models/test_fast_paths.py} -q \
        -p no:cacheprovider \
        ${TESTS_K:+-k "$TESTS_K"} 2>&1 \
        | tee "$OUT/pytest_gpu.log" | tail -25 ;;
    lora18)
      bench lora18 45 --model-shape $S18 --method lora --seq-len $SEQ $STEPS18 \
        --variants "baseline,tunesmith,tunesmith[ckpt full],baseline[again]" ;;
    lora)
      bench lora7b ${LORA_SECONDS:-200} --model-shape $S7 --method lora --seq-len $SEQ $STEPS --profile \
        ${LORA_VARIANTS:+--variants "$LORA_VARIANTS"} ;;
    qlora)
      bench qlora7b ${QLORA_SECONDS:-150} --model-shape $S7 --method qlora --seq-len $SEQ $STEPS --profile \
        ${QLORA_VARIANTS:+--variants "$QLORA_VARIANTS"} ;;
    longest)
      bench longest 110 --model-shape $S7 --method qlora --longest --card-gib 80 --longest-max $LMAX ;;
    full)
      bench full7b 150 --model-shape $S7 --method full --seq-len $SEQ $STEPS ;;
    *) echo "unknown stage $stage (tests lora18 lora qlora longest full)" ;;
  esac
done

echo
echo "== results ($(( SECONDS - START )) s) $(date -u +%H:%M:%S)"
grep -E "passed|failed|error" "$OUT/pytest_gpu.log" 2>/dev/null | tail -3
$PY -m tunesmith.bench.summary "$OUT/lora18.json" "$OUT/lora7b.json" "$OUT/qlora7b.json" "$OUT/longest.json" \
  $( [ -f "$OUT/full7b.json" ] && echo "$OUT/full7b.json" )
