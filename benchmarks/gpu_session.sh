#!/usr/bin/env bash
# One device call: GPU tests, KV speed/offload/swap/runtime peaks, the doctor on llama-3-8b. Results under $OUT.
# Usage (on the GPU machine, repository root): KVSCOPE_COMMIT=<sha> bash benchmarks/gpu_session.sh [parts]
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD/benchmarks" TRANSFORMERS_NO_ADVISORY_WARNINGS=1
OUT="${OUT:-out}"; mkdir -p "$OUT"
parts="${1:-tests,speed,doctor}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [[ $parts == *tests* ]]; then
  timeout 300 python -m pytest -q --gpu -m gpu tests -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
fi
if [[ $parts == *speed* ]]; then
  timeout 400 python benchmarks/kv_speed.py --out "$OUT/kv_speed.json" 2>&1 | tail -40
fi
if [[ $parts == *doctor* ]]; then
  timeout 240 python -m kvscope doctor llama-3-8b --random-weights --batch 64 --context 8000 --new-tokens 16 \
    --fix --out /tmp/doctor-8b > "$OUT/doctor_8b.txt" 2>&1; echo "doctor rc=$?"
  cp /tmp/doctor-8b/report.json "$OUT/doctor_8b_report.json" 2>/dev/null
  cp /tmp/doctor-8b/report.html "$OUT/doctor_8b_report.html" 2>/dev/null
  ls -la /tmp/doctor-8b
  timeout 200 python -m kvscope doctor llama-3-8b --random-weights --batch 4 --context 8000 --new-tokens 16 \
    --gpu-memory 24GiB --fix --out /tmp/doctor-24 > "$OUT/doctor_24g.txt" 2>&1; echo "doctor 24GiB rc=$?"
  cp /tmp/doctor-24/report.json "$OUT/doctor_24g_report.json" 2>/dev/null
fi
cp docs/benchmarks.md "$OUT/benchmarks.md" 2>/dev/null
ls -la "$OUT"
