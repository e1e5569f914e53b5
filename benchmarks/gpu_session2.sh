#!/usr/bin/env bash
# Second device call: KV dtype and policy speed (warm), planner accuracy (quick grid). Results under $OUT.
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD/benchmarks" TRANSFORMERS_NO_ADVISORY_WARNINGS=1
OUT="${OUT:-out}"; mkdir -p "$OUT"
timeout 250 python benchmarks/kv_speed.py --skip offload,swap,peaks --out "$OUT/kv_speed.json" 2>&1 | tail -30
timeout 280 python benchmarks/planner_accuracy.py --quick --out "$OUT/planner_accuracy.json" 2>&1 | tail -40
cp docs/benchmarks.md "$OUT/benchmarks.md"
