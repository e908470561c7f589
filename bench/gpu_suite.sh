#!/usr/bin/env bash
# The GPU run on the device machine (one H200): the GPU tests, then `tunesmith bench --end-to-end` (the product's
# own `tunesmith train` beside plain loops on one random-weight InternLM-chat-7B-shaped folder) and, when asked,
# the step bench. From the repository root, with the wheels of /work/shared/wheels/gpu/*.whl in an ignored `.whl/`
# folder (trl-1.16.0 among them: the dpo stage's baseline) and the embedded model's tokenizer saved in
# `.gpu/tokenizer` (carry [".whl", ".gpu"]):
#     bash bench/gpu_suite.sh                       # tests, then every end-to-end row
#     E2E_ROWS="plain lora; train lora @plain" bash bench/gpu_suite.sh e2e
#     bash bench/gpu_suite.sh dpo                   # preference tuning: TRL's DPOTrainer, then tunesmith train
#     DPO_ROWS="trl orpo lora; train lora orpo; train lora orpo @trl" bash bench/gpu_suite.sh dpo
#     STEP_METHOD=qlora STEP_VARIANTS="baseline,tunesmith" bash bench/gpu_suite.sh step
# The dpo stage is the e2e bench on pairs of 2 x PAIR_LENGTH (1,024) tokens; the same rows go through the e2e stage
# as E2E_ROWS="trl dpo lora; train lora dpo; train lora dpo @trl".
# Output: $OUT/suite.log (all of it), $OUT/pytest_gpu.log, $OUT/e2e.json, $OUT/dpo.json, $OUT/step.json; tables
# printed last.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/tunesmith_bench_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/suite.log") 2>&1
START=$SECONDS
TOTAL=${SUITE_SECONDS:-570}
left() { echo $(( TOTAL - (SECONDS - START) )); }
PY=python3

echo "== setup $(date -u +%H:%M:%S)"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "wheel install failed"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# the `tunesmith` command, as a user has it (editable: the checkout's code)
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || { echo "pip install -e . failed: the bench runs python -m tunesmith"; export PYTHONPATH=$PWD:$PYTHONPATH; }
command -v tunesmith >/dev/null && echo "tunesmith: $(command -v tunesmith)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
$PY -c "import trl; print('trl', trl.__version__)" 2>/dev/null \
  || echo "trl is not importable: the trl rows (dpo stage) fail; copy trl-1.16.0-py3-none-any.whl into .whl/"
TOKENIZER=${TOKENIZER:-.gpu/tokenizer}

STAGES=${*:-tests e2e}
for stage in $STAGES; do
  l=$(left)
  if (( l < 40 )); then echo "== $stage: skipped, $l s left"; continue; fi
  case $stage in
    tests)
      echo "== gpu tests $(date -u +%H:%M:%S)"
      timeout -k 5 ${TESTS_SECONDS:-150} $PY -m pytest -q -p no:cacheprovider -x \
        ${TESTS_PATH:-tests/models/fast tests/train/test_memory.py tests/train/test_units.py} \
        -m gpu ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
      timeout -k 5 ${RESUME_SECONDS:-120} $PY -m pytest -q -p no:cacheprovider tests/train/test_resume.py \
        -k every_optimizer 2>&1 | tee -a "$OUT/pytest_gpu.log" | tail -8 ;;
    e2e)
      secs=$(( $(left) - 15 ))
      echo "== end-to-end ($secs s) $(date -u +%H:%M:%S)"
      timeout -k 10 $(( secs + 10 )) $PY -m tunesmith.bench --end-to-end --model-shape ${SHAPE:-internlm-7b} \
        --tokenizer "$TOKENIZER" --work /tmp/bench_e2e --steps ${E2E_STEPS:-10} --warmup 3 --time-budget "$secs" \
        --json "$OUT/e2e.json" ${E2E_ROWS:+--rows "$E2E_ROWS"}
      for f in /tmp/bench_e2e/*.log; do echo "--- $f"; grep -E "^fast paths|^activation plan|Error|error" "$f" | head -8; done ;;
    dpo)
      secs=$(( $(left) - 15 ))
      echo "== preference tuning: tunesmith train vs TRL ($secs s) $(date -u +%H:%M:%S)"
      timeout -k 10 $(( secs + 10 )) $PY -m tunesmith.bench --end-to-end --model-shape ${SHAPE:-internlm-7b} \
        --tokenizer "$TOKENIZER" --work /tmp/bench_e2e --steps ${E2E_STEPS:-10} --warmup 3 --time-budget "$secs" \
        --pair-length ${PAIR_LENGTH:-1024} --json "$OUT/dpo.json" \
        --rows "${DPO_ROWS:-trl dpo lora; train lora dpo; train lora dpo @trl}"
      for f in /tmp/bench_e2e/trl-*.log /tmp/bench_e2e/train-*dpo*.log /tmp/bench_e2e/train-*orpo*.log; do
        [ -f "$f" ] || continue
        echo "--- $f"; grep -E "^trl step|^fast paths|^activation plan|^truncated|Error|error" "$f" | head -14
      done ;;
    step)
      secs=$(( $(left) - 15 ))
      echo "== step bench ($secs s) $(date -u +%H:%M:%S)"
      timeout -k 10 $(( secs + 10 )) $PY -m tunesmith.bench --model-shape ${SHAPE:-internlm-7b} \
        --method ${STEP_METHOD:-lora} --steps 8 --warmup 3 --time-budget "$secs" --json "$OUT/step.json" \
        ${STEP_VARIANTS:+--variants "$STEP_VARIANTS"} ;;
    *) echo "unknown stage $stage (tests e2e dpo step)" ;;
  esac
done
echo "== done ($(( SECONDS - START )) s) $(date -u +%H:%M:%S)"
grep -E "passed|failed|error" "$OUT/pytest_gpu.log" 2>/dev/null | tail -3
