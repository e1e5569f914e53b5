#!/usr/bin/env bash
# Device call: GPU tests of the cache, the decode-kernel microbenchmark, then decode speed per KV dtype end to end.
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD/benchmarks" TRANSFORMERS_NO_ADVISORY_WARNINGS=1
OUT="${OUT:-out}"; mkdir -p "$OUT"
timeout 150 python -m pytest -q --gpu -m gpu tests/cache/test_attention_triton.py -p no:cacheprovider -x 2>&1 | tail -5
timeout 150 python benchmarks/decode_kernel.py --out "$OUT/decode_kernel.json" 2>&1 | tail -60
timeout ${SPEED_TIMEOUT:-280} python benchmarks/kv_speed.py --skip policies,offload,swap,peaks --out "$OUT/kv_dtype_speed.json" 2>&1 | grep -v "^{" | tail -40
cp docs/benchmarks.md "$OUT/benchmarks.md"
