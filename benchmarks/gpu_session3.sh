#!/usr/bin/env bash
# Device call 1 of this session: the GPU tests (fused decode attention included), then decode speed per KV dtype,
# fused and unfused, interleaved. Results under $OUT.
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD/benchmarks" TRANSFORMERS_NO_ADVISORY_WARNINGS=1
OUT="${OUT:-out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
[[ ${SKIP_TESTS:-0} == 1 ]] || timeout 240 python -m pytest -q --gpu -m gpu tests/cache -p no:cacheprovider 2>&1 | tail -25 > "$OUT/gpu_tests.txt"
[[ ${SKIP_TESTS:-0} == 1 ]] || tail -5 "$OUT/gpu_tests.txt"
timeout ${SPEED_TIMEOUT:-330} python benchmarks/kv_speed.py --skip policies,offload,swap,peaks --out "$OUT/kv_dtype_speed.json" 2>&1 \
  | grep -v "^{" | tail -60
cp docs/benchmarks.md "$OUT/benchmarks.md"
