#!/usr/bin/env bash
# Device call: decode steps of attention-reading policies (h2o, lru, snapkv, tova) now run the fused decode kernel,
# which also returns the weights they observe. GPU tests of the kernels and the cache, then the eviction-policy speed.
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD/benchmarks" TRANSFORMERS_NO_ADVISORY_WARNINGS=1
OUT="${OUT:-out}"; mkdir -p "$OUT"
timeout 240 python -m pytest -q --gpu -m gpu tests -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 300 python benchmarks/kv_speed.py --skip dtypes,offload,swap,peaks --section kv-policy-speed-observe \
  --out "$OUT/kv_policy_speed_observe.json" 2>&1 | tail -25
cp docs/benchmarks.md "$OUT/benchmarks.md"
