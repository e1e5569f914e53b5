"""`doctor()`: the seeds' whole debugging walk as one call.

1. plan the workload (the planner's prediction and fixes);
2. run it under the monitor (on a GPU, optionally emulating a smaller one; on the CPU, against the KV budget);
3. on failure, keep the allocator snapshot, attribute memory, explain it, and rank fixes;
4. write report.json, report.html and the snapshot atomically into `out` (the diagnosis is on disk before any re-run);
5. with `fix=True`, apply the best fix this machine can run, re-run, check the outcome against the fix's estimate,
   and write the report again with the outcome.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import tempfile
from dataclasses import dataclass, replace

import torch

from kvscope import __version__
from kvscope.doctor.apply import apply_fix, best_fix, fix_figure, kv_layers, report_status
from kvscope.doctor.diagnose import attribution, diagnose, fixes_for_budget, fixes_from_plan, workload_dict
from kvscope.doctor.execute import execute
from kvscope.errors import does_not_fit, usage
from kvscope.models.quantize import model_bytes, weights_format_of
from kvscope.monitor import Monitor
from kvscope.planner.memory import kv_bytes
from kvscope.planner.plan import plan
from kvscope.planner.sizes import format_bytes, parse_size
from kvscope.planner.workload import Workload
from kvscope.report.model import DeviceInfo, DoctorReport, Evictions, KVTimeline, ModelInfo, Phase, RunOutcome, Timeline

SNAPSHOT_ENTRIES = 200_000


@dataclass
class DoctorResult:
    report: DoctorReport
    paths: dict

    @property
    def status(self) -> str:
        return self.report.outcome.status

    @property
    def fixed(self) -> bool:
        """The workload failed, and the applied fix ran as estimated."""
        return self.report.fix_outcome is not None and self.report.fix_outcome.status == "ok"


def emulate_capacity(gpu_memory: str | int | None, device) -> tuple[int, bool]:
    """(capacity, emulated). With `gpu_memory` on CUDA, cap this process so that PyTorch plus what the CUDA context
    already holds fits in `gpu_memory`, as on a card of that size."""
    total = torch.cuda.get_device_properties(device).total_memory
    if gpu_memory is None:
        return total, False
    size = parse_size(gpu_memory)
    if size > total:
        raise usage(f"a {format_bytes(size)} GPU cannot be emulated on this one ({format_bytes(total)})",
                    expected=f"--gpu-memory of at most {total}B", fix="--gpu-memory")
    free, _ = torch.cuda.mem_get_info(device)
    outside = max(0, (total - free) - torch.cuda.memory_reserved(device))  # CUDA context and other non-PyTorch use
    torch.cuda.set_per_process_memory_fraction(max(0.0, (size - outside) / total), device)
    return size, True


def doctor(loaded, w: Workload, *, fix: bool = False, out: str | os.PathLike, force: bool = False,
           command: str | None = None, progress=None, fix_command=None) -> DoctorResult:
    """Run `w` on `loaded` under the monitor, diagnose it and write the report into `out` (which must be empty or new,
    unless `force`). The workload carries its cache's policy and knobs and the device memory to emulate
    (`w.gpu_memory`). `fix_command(fix)` may return the command line that applies a fix (the CLI passes one)."""
    from kvscope.report import check_out_dir, write_report

    out_dir = check_out_dir(out, force=force)
    w = with_policy(w)
    model, spec = loaded.model, loaded.spec
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    held = weights_format_of(model)
    if held != w.weights:
        raise usage(f"the model's weights are {held or 'dense'}, but the workload says --weights {w.weights or 'none'}",
                    expected="the workload's weights as the model was loaded", fix="--weights")
    notes: list[str] = []
    capacity, emulated = _capacity(w.gpu_memory, device, notes, w, spec)
    planned = plan(spec, w, gpu_memory=capacity)
    prediction = planned.to_dict()
    weights = model_bytes(model)  # through torchao's tensor subclasses to the bytes they hold
    snapshot = None
    if cuda:
        torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_ENTRIES, context="alloc", stacks="python")
        fd, snapshot = tempfile.mkstemp(prefix="kvscope-snapshot-", suffix=".pickle")
        os.close(fd)
    monitor = Monitor(device=(device.index or 0) if cuda else None).start()
    try:
        try:
            outcome = execute(model, spec, w, monitor=monitor, snapshot_path=snapshot, progress=progress)
        finally:
            if cuda:
                torch.cuda.memory._record_memory_history(enabled=None)
        parts = attribution(outcome, weights, capacity)
        diagnosis = diagnose(outcome, w, prediction, parts, capacity, spec=spec, cuda=cuda)
        if outcome.status == "kv_budget_exceeded":
            fixes = fixes_for_budget(spec, w)
        elif outcome.status == "oom" or not prediction["fits"]:
            fixes = fixes_from_plan(planned.advice, cuda, str(device))
        else:
            fixes = []
        fixes = [replace(f, command=fix_command(f)) for f in fixes] if fix_command else fixes
        report = DoctorReport(
            kvscope_version=__version__, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            command=command or " ".join(sys.argv),
            model=ModelInfo(spec.name, spec.num_layers, spec.num_kv_heads, spec.head_dim, weights),
            workload=workload_dict(spec, w), device=_device(device, capacity, emulated), prediction=prediction,
            outcome=_outcome(outcome, w), kv_layers=kv_layers(outcome.kv_layers),
            kv_layers_workload=workload_dict(spec, w), attribution=parts, diagnosis=diagnosis,
            fixes=[f.to_dict() for f in fixes], notes=notes)
        _record_monitor(report, monitor)
        snapshot_name = snapshot if outcome.status == "oom" and snapshot and os.path.getsize(snapshot) > 0 else None
        best = best_fix(fixes) if fix else None
        if fix:
            notes.append(_fix_note(outcome.status, best))
        if best is not None:  # the diagnosis is on disk before the re-run: an interrupted re-run loses nothing
            notes.append(f"re-running with the fix {best.option}; if this note stays, the re-run did not finish")
        paths = write_report(out_dir, report, snapshot_src=snapshot_name, move_snapshot=True, force=force)
        if best is not None:
            report = _fix_and_rewrite(loaded, best, report, monitor, out_dir, capacity, progress)
    finally:
        monitor.stop()
        if emulated:
            torch.cuda.set_per_process_memory_fraction(1.0, device)  # the emulated cap must not outlive the diagnosis
        if snapshot and os.path.exists(snapshot):
            os.unlink(snapshot)
    return DoctorResult(report, {k: str(v) for k, v in paths.items()})


def with_policy(w: Workload) -> Workload:
    """kvscope's cache runs `full` when no policy is named; the planner needs it said, since the policy decides the
    cache's shape (a policy that never evicts has no room above its budget)."""
    return w.with_(policy="full") if w.runtime == "kvscope" and w.policy is None else w


def _capacity(gpu_memory, device, notes: list[str], w: Workload, spec) -> tuple[int, bool]:
    if device.type == "cuda":
        capacity, emulated = emulate_capacity(gpu_memory, device)
        if emulated:
            notes.append(f"emulating a {format_bytes(capacity)} GPU on {torch.cuda.get_device_name(device)} with "
                         "torch.cuda.set_per_process_memory_fraction")
        return capacity, emulated
    import psutil

    available = psutil.virtual_memory().available
    if w.runtime == "kvscope" and kv_bytes(spec, w) > available:  # a CPU allocation this size fails or swaps
        raise does_not_fit(f"the KV cache for this workload would allocate {format_bytes(kv_bytes(spec, w))} "
                           f"(budget + one prefill chunk, batch {w.batch}), but this machine has "
                           f"{format_bytes(available)} available", expected="a KV cache that fits in host memory",
                           fix="--budget, --batch or --context")
    notes.append("no CUDA device: the doctor measured process memory (RSS) and the KV budget instead of GPU "
                 "memory; GPU figures below are the planner's predictions")
    return (parse_size(gpu_memory) if gpu_memory else psutil.virtual_memory().total), False


def _device(device, capacity: int, emulated: bool) -> DeviceInfo:
    if device.type != "cuda":
        return DeviceInfo("CPU", False, None, capacity, emulated)
    return DeviceInfo(torch.cuda.get_device_name(device), True, torch.cuda.get_device_properties(device).total_memory,
                      capacity, emulated)


def _outcome(o, w: Workload) -> RunOutcome:
    error = o.error
    if o.status == "kv_budget_exceeded":  # said with the report's one count of tokens; the cache's own words stay
        error = (f"layer 0 had to hold {o.held_tokens} KV tokens per sequence in {o.failed_in}, over its budget of "
                 f"{w.budget_tokens} (policy 'full' never evicts; the whole sequence needs {w.kv_tokens})")
    return RunOutcome(report_status(o.status), o.status, error, o.error, o.peak_allocated_bytes, o.peak_reserved_bytes,
                      o.peak_rss_bytes, round(o.seconds, 3), o.kv_bytes, o.evicted_tokens, o.decode_tokens_per_second,
                      o.to_dict()["at_failure"], o.failed_at, o.failed_in, o.held_tokens)


def _record_monitor(report: DoctorReport, monitor: Monitor) -> None:
    """The monitor's timeline, phases and evictions, plus the KV cache's allocated bytes over time, into `report`."""
    d = monitor.to_dict()
    report.timeline = Timeline(**d["timeline"])
    report.phases = [Phase(**p) for p in d["phases"]]
    report.evictions = Evictions(**d["evictions"])
    events = monitor.kv_events
    report.kv_timeline = KVTimeline([e["t"] for e in events], [e["bytes"] for e in events],
                                    [e["stored_tokens"] for e in events])


def _fix_note(status: str, best) -> str:
    if status == "ok":
        return "--fix: nothing to fix, the workload ran within capacity; no change was applied"
    if best is None:
        return "--fix: no fix can be applied on this machine (the remaining ones need other hardware)"
    return f"--fix: applied the best fix this machine can run: {best.action} ({best.option})"


def _fix_and_rewrite(loaded, best, report: DoctorReport, monitor: Monitor, out_dir, capacity,
                     progress) -> DoctorReport:
    from kvscope.report import write_report

    notes = report.notes
    pending = notes.pop()  # "re-running with the fix ...": true only while the re-run runs
    try:
        fix_outcome = apply_fix(loaded, best, monitor, capacity=capacity, progress=progress)
    except KeyboardInterrupt:
        notes.append(pending.replace("; if this note stays, the re-run did not finish", ": interrupted (Ctrl-C) "
                                     "before it finished, so there is no fix outcome"))
        _record_monitor(report, monitor)
        write_report(out_dir, report, update=True)
        raise
    report.fix_outcome = fix_outcome
    report.kv_layers = kv_layers(fix_outcome.kv_layers)
    report.kv_layers_workload = fix_outcome.workload
    report.diagnosis.figures.append(fix_figure(fix_outcome))
    notes.append("the timeline continues with the fixed run (phases marked 'fix'); the per-layer KV chart shows the "
                 "fixed run")
    if not fix_outcome.check.agrees:
        notes.append("the applied fix did not turn out as estimated: " + "; ".join(fix_outcome.check.problems))
    _record_monitor(report, monitor)
    write_report(out_dir, report, update=True)
    return report
