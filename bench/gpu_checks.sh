#!/usr/bin/env bash
# Correctness on the device machine (best with two GPUs, kind nvidia-h200-x2): every gpu-marked test, the
# CPU-written training / export / chat tests again with CUDA visible (bf16 paths), and the decode check of
# `tunesmith chat`'s graph mode against plain generate with a static cache. Output: $OUT/checks.log.
#     bash bench/gpu_checks.sh            (carry [".whl"], wheels of /work/shared/wheels/gpu/)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/tunesmith_checks_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/checks.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || echo "wheel install failed"
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== gpu-marked tests $(date -u +%T)"
timeout -k 5 300 python3 -m pytest -m gpu tests -q -p no:cacheprovider -rs -s 2>&1 | grep -v "^$" | tail -40
echo "== train/export/infer tests with CUDA visible $(date -u +%T)"
timeout -k 5 240 python3 -m pytest tests/train tests/export -q -p no:cacheprovider -x -m "not gpu" 2>&1 | tail -15
echo "== decode check $(date -u +%T)"
timeout -k 5 150 python3 bench/decode_bench.py --model-shape internlm-7b --new-tokens 1000 --modes graph \
  --baseline-cache static 2>&1 | tail -8
echo "== done $(date -u +%T)"
