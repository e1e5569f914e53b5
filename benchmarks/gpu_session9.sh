#!/usr/bin/env bash
# Device call: verify the review fixes of f4da833 on the GPU (every GPU test), then re-measure the eviction-policy
# decode speed now that decode steps of attention-free policies run the fused Triton kernel.
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD/benchmarks" TRANSFORMERS_NO_ADVISORY_WARNINGS=1
OUT="${OUT:-out}"; mkdir -p "$OUT"
timeout 240 python -m pytest -q --gpu -m gpu tests -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 300 python benchmarks/kv_speed.py --skip dtypes,offload,swap,peaks --section kv-policy-speed \
  --out "$OUT/kv_policy_speed.json" 2>&1 | tail -25
cp docs/benchmarks.md "$OUT/benchmarks.md"
