"""`doctor()`: the seeds' whole debugging walk as one call.

1. plan the workload (the planner's prediction and fixes);
2. run it under the monitor (on a GPU, optionally emulating a smaller one; on the CPU, against the KV budget);
3. on failure, keep the allocator snapshot, attribute memory, explain it, and rank fixes;
4. with `fix=True`, apply the best fix this machine can run, re-run, and report the outcome;
5. write report.json, report.html and the snapshot atomically into `out`.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import tempfile
from dataclasses import dataclass

import torch

from kvscope import __version__
from kvscope.doctor.diagnose import attribution, diagnose, fixes_for_budget, fixes_from_plan
from kvscope.doctor.execute import Outcome, execute
from kvscope.errors import usage
from kvscope.kvformats import KV_FORMATS
from kvscope.monitor import Monitor
from kvscope.planner.plan import plan
from kvscope.planner.sizes import format_bytes, parse_size
from kvscope.planner.workload import Workload

SNAPSHOT_ENTRIES = 200_000


@dataclass
class DoctorResult:
    report: dict
    paths: dict

    @property
    def status(self) -> str:
        return self.report["outcome"]["status"]


def emulate_capacity(gpu_memory: str | int | None, device) -> tuple[int, bool]:
    """(capacity, emulated). With `gpu_memory` on CUDA, cap this process so that PyTorch plus what the CUDA context
    already holds fits in `gpu_memory`, as on a card of that size."""
    total = torch.cuda.get_device_properties(device).total_memory
    if gpu_memory is None:
        return total, False
    size = parse_size(gpu_memory)
    if size > total:
        raise usage(f"--gpu-memory {format_bytes(size)} is larger than this GPU ({format_bytes(total)})",
                    expected=f"at most {format_bytes(total)}", fix="--gpu-memory")
    free, _ = torch.cuda.mem_get_info(device)
    outside = max(0, (total - free) - torch.cuda.memory_reserved(device))  # CUDA context and other non-PyTorch use
    torch.cuda.set_per_process_memory_fraction(max(0.0, (size - outside) / total), device)
    return size, True


def doctor(loaded, w: Workload, *, policy: str = "full", gpu_memory: str | None = None, fix: bool = False,
           out: str | os.PathLike, command: str | None = None, progress=None) -> DoctorResult:
    from kvscope.report import check_out_dir, write_report

    out_dir = check_out_dir(out)
    model, spec = loaded.model, loaded.spec
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    notes: list[str] = []
    if cuda:
        capacity, emulated = emulate_capacity(gpu_memory, device)
        if emulated:
            notes.append(f"emulating a {format_bytes(capacity)} GPU on {torch.cuda.get_device_name(device)} with "
                         "torch.cuda.set_per_process_memory_fraction")
        torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_ENTRIES, context="alloc", stacks="python")
    else:
        import psutil

        capacity = parse_size(gpu_memory) if gpu_memory else psutil.virtual_memory().total
        emulated = False
        notes.append("no CUDA device: the doctor measured process memory (RSS) and the KV budget instead of GPU "
                     "memory; GPU figures below are the planner's predictions")
    prediction = plan(spec, w, gpu_memory=capacity).to_dict()
    weights = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    snapshot = None
    if cuda:
        fd, snapshot = tempfile.mkstemp(prefix="kvscope-snapshot-", suffix=".pickle")
        os.close(fd)
    monitor = Monitor(device=(device.index or 0) if cuda else None).start()
    try:
        outcome = execute(model, spec, w, policy=policy, monitor=monitor, snapshot_path=snapshot, progress=progress)
    finally:
        if cuda:
            torch.cuda.memory._record_memory_history(enabled=None)
    parts = attribution(outcome, weights, capacity)
    per_token = {name: spec.kv_bytes_per_token(name, w.tp) for name in KV_FORMATS}
    diagnosis = diagnose(outcome, w, prediction, parts, capacity, policy=policy,
                         kv_bytes_per_token_layer=per_token[w.kv_dtype] // spec.num_layers, layers=spec.num_layers)
    if outcome.status == "kv_budget_exceeded":
        fixes = fixes_for_budget(w, policy, per_token, w.dtype)
    elif outcome.status == "oom" or not prediction["fits"]:
        fixes = fixes_from_plan(prediction, w, cuda)
    else:
        fixes = []
    fix_outcome = None
    kv_layers = outcome.kv_layers
    if fix:
        fix_outcome = _apply_fix(loaded, fixes, outcome, notes, monitor, progress)
        if fix_outcome is not None:
            kv_layers = fix_outcome["kv_layers"]
            notes.append("the timeline continues with the fixed run (phases marked 'fix'); the per-layer KV table "
                         "shows the fixed run")
    monitor.stop()
    if emulated:
        torch.cuda.set_per_process_memory_fraction(1.0, device)  # the emulated cap must not outlive the diagnosis
    snapshot_name = snapshot if outcome.status == "oom" and snapshot and os.path.getsize(snapshot) > 0 else None
    report = {
        "kvscope_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(sys.argv),
        "model": {"name": spec.name, "num_layers": spec.num_layers, "kv_heads": spec.num_kv_heads,
                  "head_dim": spec.head_dim, "weights_bytes": weights},
        "workload": {**w.to_dict(), "policy": policy if w.runtime == "kvscope" else None},
        "device": {"name": torch.cuda.get_device_name(device) if cuda else "CPU", "cuda": cuda,
                   "total_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
                   "capacity_bytes": capacity, "emulated": emulated},
        "prediction": prediction,
        "outcome": {"status": _report_status(outcome.status), "detail": outcome.status, "error": outcome.error,
                    "peak_allocated_bytes": outcome.peak_allocated_bytes,
                    "peak_reserved_bytes": outcome.peak_reserved_bytes, "peak_rss_bytes": outcome.peak_rss_bytes,
                    "seconds": round(outcome.seconds, 3), "kv_bytes": outcome.kv_bytes,
                    "evicted_tokens": outcome.evicted_tokens,
                    "decode_tokens_per_second": outcome.decode_tokens_per_second,
                    "at_failure": outcome.to_dict()["at_failure"]},
        **monitor.to_dict(),
        "kv_layers": kv_layers,
        "attribution": parts,
        "diagnosis": diagnosis,
        "fixes": [f.to_dict() for f in fixes],
        "fix_outcome": fix_outcome,
        "snapshot": "memory_snapshot.pickle" if snapshot_name else None,
        "notes": notes,
    }
    paths = write_report(out_dir, report, snapshot_src=snapshot_name, move_snapshot=True)
    if snapshot and os.path.exists(snapshot):
        os.unlink(snapshot)
    return DoctorResult(report, {k: str(v) for k, v in paths.items()})


def _report_status(status: str) -> str:
    return {"ok": "ok", "oom": "oom"}.get(status, "error")


def _apply_fix(loaded, fixes, outcome: Outcome, notes: list[str], monitor: Monitor, progress=None) -> dict | None:
    if outcome.status == "ok":
        notes.append("--fix: nothing to fix, the workload ran within capacity; no change was applied")
        return None
    best = next((f for f in fixes if f.workload is not None and f.fits), None)
    if best is None:
        notes.append("--fix: no fix can be applied on this machine (the remaining ones need other hardware)")
        return None
    spec = loaded.spec
    w = best.workload
    monitor.mark("fix", best.option)
    again = execute(loaded.model, spec, w, policy=best.policy or "full", monitor=monitor, phase_prefix="fix: ",
                    progress=progress)
    return {"applied": f"{best.change} ({best.option})", "status": _report_status(again.status),
            "detail": again.status, "error": again.error, "peak_allocated_bytes": again.peak_allocated_bytes,
            "peak_rss_bytes": again.peak_rss_bytes, "kv_bytes": again.kv_bytes,
            "evicted_tokens": again.evicted_tokens, "seconds": round(again.seconds, 3),
            "workload": {**w.to_dict(), "policy": best.policy}, "kv_layers": again.kv_layers,
            "decode_tokens_per_second": again.decode_tokens_per_second}
