"""Tensor parallel on two GPUs: the `llama-3.1-70b` shape with random bf16 weights split over 2 ranks by transformers'
plan (`kvscope.distributed`), each rank's measured peak against the planner's per-GPU figure, decode tokens/s at batch
1 and 8, and an out-of-memory workload on the ranks (what failed, where, and the planner's ranked fixes for it).

    NCCL_NVLS_ENABLE=0 python -m benchmarks.tp --out docs/data          # needs 2 CUDA GPUs

It writes `<out>/tp-cuda.json` as each part ends. Nothing here runs without two GPUs: the script says so and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks.common import command_line, commit, device_line, save_json

MODEL = "llama-3.1-70b"
TP = 2
CONTEXT, NEW_TOKENS = 1024, 128
BATCHES = (1, 8)
OOM = {"batch": 64, "context": 8000, "new_tokens": 16}  # the planner puts this far over 2 x 141 GB


def measure(batch: int, context: int, new_tokens: int) -> dict:
    """One generation on TP ranks (policy full, cache sized to the sequence): every rank's figures, and the plan."""
    import torch

    from kvscope.distributed import launch, merge_ranks
    from kvscope.distributed.ranks import run_job
    from kvscope.models.spec import ModelSpec
    from kvscope.planner import Workload, plan
    from kvscope.runtime.session import random_ids

    spec = ModelSpec.from_catalogue(MODEL)
    ids = random_ids(spec.vocab_size, context, batch=batch)
    job = {"model": MODEL, "random_weights": True, "dtype": "bf16", "ids": ids, "policy": "full", "knobs": {},
           "budget": None, "kv_dtype": None, "new_tokens": new_tokens, "chunk_size": 512}
    w = Workload(batch=batch, context=context, new_tokens=new_tokens, tp=TP, runtime="kvscope")
    capacity = torch.cuda.get_device_properties(0).total_memory
    predicted = plan(spec, w, gpu_memory=capacity)
    row = {"batch": batch, "context": context, "new_tokens": new_tokens, "planned_peak_bytes": predicted.peak_bytes,
           "planned_fits": predicted.fits, "planned_weights_bytes": predicted.weights_bytes}
    start = time.perf_counter()
    try:
        results = launch(run_job, job, TP, backend="nccl")
    except Exception as exc:  # noqa: BLE001 - the OOM part expects a failure; it is recorded as it came
        row.update(outcome=type(exc).__name__, message=getattr(exc, "cli_text", str(exc)),
                   advice=[{"fix": f.action, "option": f.option} for f in predicted.advice][:5])
        return row
    merged = merge_ranks(results)
    row.update(outcome="ran", seconds=round(time.perf_counter() - start, 1), ranks=merged["ranks"],
               agree=merged["agree"], max_peak_bytes=merged["total"]["max_peak_bytes"],
               peak_error=merged["total"]["max_peak_bytes"] / predicted.peak_bytes - 1,
               decode_tokens_per_second=[r["decode_tokens_per_second"] for r in merged["ranks"]])
    return row


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/data", help="directory for tp-cuda.json (default docs/data)")
    args = p.parse_args(argv)
    if torch.cuda.device_count() < TP:
        print(f"benchmarks.tp: needs {TP} CUDA GPUs, this machine has {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    if os.environ.get("NCCL_NVLS_ENABLE") != "0":
        print("benchmarks.tp: set NCCL_NVLS_ENABLE=0 (NVLink multicast stays off on the lent machines)",
              file=sys.stderr)
        return 2
    out = Path(args.out) / "tp-cuda.json"
    data = {"device": device_line(), "gpus": torch.cuda.device_count(), "commit": commit(), "command": command_line(),
            "date": time.strftime("%Y-%m-%d"), "model": MODEL, "tp": TP, "runs": []}
    for batch in BATCHES:
        data["runs"].append(measure(batch, CONTEXT, NEW_TOKENS))
        save_json(data, out)
    data["oom"] = measure(**OOM)
    save_json(data, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
