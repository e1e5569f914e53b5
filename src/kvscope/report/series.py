"""What the report's charts draw, as plain numbers: the timeline's series, the KV budgets and failures on it, and the
per-layer KV rows (kvscope.report.figures draws them)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from kvscope.planner.sizes import format_bytes
from kvscope.report.model import DoctorReport, number

MAX_POINTS = 1500  # per line; longer series are reduced to per-bucket min and max, so peaks survive
Point = tuple[float, float] | None  # None marks a gap (a missing or non-finite sample)


def points(xs: Sequence, ys: Sequence) -> list[Point]:
    out: list[Point] = []
    for x, y in zip(xs or [], ys or []):
        fx, fy = number(x), number(y)
        out.append(None if fx is None or fy is None else (fx, fy))
    return out


def decimate(pts: list[Point], limit: int = MAX_POINTS) -> list[Point]:
    """At most about `limit` points: each bucket keeps its first, min, max and last sample in time order."""
    if len(pts) <= limit:
        return pts
    size = math.ceil(len(pts) / (limit / 4))
    out: list[Point] = []
    for start in range(0, len(pts), size):
        bucket = pts[start:start + size]
        if any(p is None for p in bucket):
            out.extend(bucket[:1] + [None] + bucket[-1:])
            continue
        keep = {0, len(bucket) - 1, min(range(len(bucket)), key=lambda i: bucket[i][1]),
                max(range(len(bucket)), key=lambda i: bucket[i][1])}
        out.extend(bucket[i] for i in sorted(keep))
    return out


def timeline_series(r: DoctorReport) -> list[tuple[str, str, list[Point]]]:
    """(key, label, points) of every memory series with samples, the KV cache's allocation among them."""
    tl = r.timeline
    series = []
    for key, label, values in (("allocated", "allocated", tl.allocated), ("reserved", "reserved", tl.reserved),
                               ("nvml_used", "NVML used", tl.nvml_used), ("rss", "process RSS (host)", tl.rss)):
        pts = points(tl.t, values or [])
        if any(p is not None for p in pts):
            series.append((key, label, decimate(pts)))
    pts = points(r.kv_timeline.t, r.kv_timeline.bytes)
    if any(p is not None and p[1] > 0 for p in pts):
        series.append(("kv_cache", "KV cache (allocated)", decimate(pts)))
    return series


def fix_start(r: DoctorReport) -> float | None:
    return next((p.start for p in r.phases if p.name == "fix"), None)


def budget_lines(r: DoctorReport) -> list[tuple[str, float, float | None]]:
    """(label, bytes, start time) of the KV budgets that ran: the workload's, and the fix's from when it started."""
    lines = []
    budget = number(r.workload.get("kv_budget_bytes"))
    if budget:
        lines.append((f"KV budget {format_bytes(budget)} (budget + one chunk)", budget, None))
    fixed = number(r.fix_outcome.workload.get("kv_budget_bytes")) if r.fix_outcome else None
    if fixed and fixed != budget:
        lines.append((f"fix's KV budget {format_bytes(fixed)}", fixed, fix_start(r)))
    return lines


def failures(r: DoctorReport, xs: list[float]) -> list[tuple[str, float]]:
    """(label, time) of each failed run: the workload's (at its own failure, not at the end of the timeline) and the
    fix's, if it failed too."""
    out = []
    for o, prefix in ((r.outcome, ""), (r.fix_outcome, "fix: ")):
        status = str(getattr(o, "status", None) or "").lower()
        if status not in ("oom", "error"):
            continue
        at = o.failed_at
        if at is None and o is r.outcome:  # older reports: the end of the first run, before any fix started
            at = fix_start(r) if fix_start(r) is not None else max(xs)
        if at is not None:
            detail = str(o.detail or status)
            label = "OOM" if status == "oom" else ("KV budget exceeded" if detail == "kv_budget_exceeded" else "error")
            out.append((prefix + label, at))
    return out


def kv_rows(r: DoctorReport) -> tuple[list[tuple], dict]:
    """Per layer (layer, stored per sequence, evicted per sequence, bytes of the whole batch, allocated slots), and
    the workload the rows come from. The cache counts evictions over the batch; the chart divides them by it, so a
    bar is one sequence: stored + evicted = the tokens that sequence fed."""
    w = r.kv_layers_workload or r.workload
    batch = number(w.get("batch")) or 1.0
    rows = [(int(x.layer) if x.layer is not None else i, x.stored_tokens or 0.0, (x.evicted_tokens or 0.0) / batch,
             x.bytes, x.capacity_tokens) for i, x in enumerate(r.kv_layers)]
    return rows, w
