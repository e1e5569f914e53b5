#!/usr/bin/env bash
# Device call: int4 with layer offload -- GPU tests of offload, then decode speed and resident KV at 8k and 32k.
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD/benchmarks" TRANSFORMERS_NO_ADVISORY_WARNINGS=1
OUT="${OUT:-out}"; mkdir -p "$OUT"
timeout 120 python -m pytest -q --gpu -m gpu tests/cache/test_offload.py -p no:cacheprovider 2>&1 | tail -4
timeout 330 python benchmarks/kv_speed.py --skip dtypes,policies,swap,peaks --offload-kv int4 \
  --section kv-offload-int4 --out "$OUT/kv_offload_int4.json" 2>&1 | grep -v "^{" | tail -20
cp docs/benchmarks.md "$OUT/benchmarks.md"
