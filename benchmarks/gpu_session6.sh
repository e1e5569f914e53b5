#!/usr/bin/env bash
# Device call: decode-kernel microbenchmark (batches 1-8), then decode speed per KV dtype end to end, tuned kernels.
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD/benchmarks" TRANSFORMERS_NO_ADVISORY_WARNINGS=1
OUT="${OUT:-out}"; mkdir -p "$OUT"
timeout 170 python benchmarks/decode_kernel.py --out "$OUT/decode_kernel.json" 2>&1 | grep "default\|unfused\|floor" | cut -c1-150
timeout 400 python benchmarks/kv_speed.py --skip policies,offload,swap,peaks --out "$OUT/kv_dtype_speed.json" 2>&1 | grep -v "^{" | tail -40
cp docs/benchmarks.md "$OUT/benchmarks.md"
