#!/usr/bin/env bash
# Device call: issue 5 on the H100 -- the doctor on a llama-3-8b OOM (attribution + fix), profile with NVTX, fit.
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD/benchmarks" TRANSFORMERS_NO_ADVISORY_WARNINGS=1
OUT="${OUT:-out}"; mkdir -p "$OUT"
which nsys || echo "no nsys on this machine"
timeout 200 python -m kvscope doctor llama-3-8b --random-weights --batch 64 --context 8000 --new-tokens 16 \
  --fix --out /tmp/doctor-8b > "$OUT/doctor_8b.txt" 2>&1; echo "doctor rc=$?"
cp /tmp/doctor-8b/report.json "$OUT/doctor_8b_report.json"; cp /tmp/doctor-8b/report.html "$OUT/doctor_8b_report.html"
ls -la /tmp/doctor-8b
timeout 120 python -m kvscope profile llama-3-8b --random-weights --context 2048 --batch 4 --max-new-tokens 16 \
  --runtime kvscope --nvtx --out /tmp/prof > "$OUT/profile.txt" 2>&1; echo "profile rc=$?"
ls -la /tmp/prof; du -sh /tmp/prof/*
timeout 200 python -m kvscope fit llama-3-8b --random-weights --context 8000 --new-tokens 16 \
  > "$OUT/fit.txt" 2>&1; echo "fit rc=$?"
tail -30 "$OUT/fit.txt"
