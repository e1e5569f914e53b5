#!/usr/bin/env bash
# Device call: the reworked int4 tile loader -- GPU tests of the kernels, then the kernel microbenchmark for int4.
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD/benchmarks" TRANSFORMERS_NO_ADVISORY_WARNINGS=1
OUT="${OUT:-out}"; mkdir -p "$OUT"
timeout 150 python -m pytest -q --gpu -m gpu tests/cache/test_attention_triton.py tests/cache/test_quant.py tests/cache/test_offload.py -p no:cacheprovider 2>&1 | tail -4
timeout 150 python benchmarks/decode_kernel.py --kv int4 --section decode-kernel-int4 --out "$OUT/decode_kernel_int4.json" 2>&1 | grep "default\|unfused" | cut -c1-140
cp docs/benchmarks.md "$OUT/benchmarks.md"
