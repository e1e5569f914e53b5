#!/usr/bin/env bash
# Device call: fused vs unfused decode per eviction policy, interleaved (3 rounds), after attention-reading policies
# moved to the fused decode kernel (its weights output). GPU tests already passed in gpu_session10.sh (112 of 112).
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD/benchmarks" TRANSFORMERS_NO_ADVISORY_WARNINGS=1
OUT="${OUT:-out}"; mkdir -p "$OUT"
timeout 560 python benchmarks/kv_speed.py --skip dtypes,offload,swap,peaks --rounds 3 \
  --policies full,sliding_window,tova,snapkv,h2o,lru --section kv-policy-speed-observe \
  --out "$OUT/kv_policy_speed_observe.json" 2>&1 | grep -v "^{" | tail -70
cp docs/benchmarks.md "$OUT/benchmarks.md"
