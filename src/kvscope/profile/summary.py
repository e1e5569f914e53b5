"""Read a finished `torch.profiler.profile` into plain numbers: phase times, time per decoder layer, top operators.

Our named ranges are read from the raw CPU-side events (not `key_averages()`), so that on CUDA the device-side copy of
each annotation is never counted twice; operators come from `key_averages()`, CPU-side entries only, whose device
columns add up the kernels each operator launched.
"""

from __future__ import annotations

from typing import Any

from torch.autograd import DeviceType

from kvscope.profile.ranges import LAYER_PREFIX, PHASES, PREFIX, phase_range_name

US_PER_MS = 1000.0


def _get(event, name: str, old_name: str | None = None, default: Any = 0):
    """An event attribute under its current name, or its pre-2.4 `cuda_*` name."""
    if hasattr(event, name):
        return getattr(event, name)
    return getattr(event, old_name, default) if old_name else default


def _is_cpu(event) -> bool:
    return _get(event, "device_type", default=DeviceType.CPU) == DeviceType.CPU


def _ms(us: float) -> float:
    return round(us / US_PER_MS, 3)


def ranges(events, prefix: str = PREFIX) -> list:
    """The CPU-side events of kvscope's named ranges, in start order."""
    picked = [e for e in events if e.name.startswith(prefix) and _is_cpu(e)]
    return sorted(picked, key=lambda e: e.time_range.start)


def phase_seconds(events) -> dict[str, float]:
    """`{prefill_seconds, decode_seconds}`: the summed length of each phase's range."""
    totals = dict.fromkeys(PHASES, 0.0)
    for e in ranges(events):
        for phase in PHASES:
            if e.name == phase_range_name(phase):
                totals[phase] += e.time_range.elapsed_us()
    return {f"{phase}_seconds": round(us / 1e6, 6) for phase, us in totals.items()}


def layer_rows(events, num_layers: int, device: bool = False) -> list[dict[str, Any]]:
    """One row per decoder layer: calls, total and self time, and the time spent in each phase.

    `self_ms` is the time inside the layer's range that no operator accounts for (Python and hook overhead); on CUDA,
    `device_ms` sums the kernels the layer launched.
    """
    named = ranges(events)
    phases = [(e.name[len(PREFIX):], e.time_range.start, e.time_range.end) for e in named
              if not e.name.startswith(LAYER_PREFIX)]
    rows = {i: _empty_row(i, device) for i in range(num_layers)}
    for e in named:
        if not e.name.startswith(LAYER_PREFIX):
            continue
        row = rows.setdefault(int(e.name[len(LAYER_PREFIX):]), _empty_row(int(e.name[len(LAYER_PREFIX):]), device))
        total = e.time_range.elapsed_us()
        row["calls"] += 1
        row["total_ms"] += total
        row["self_ms"] += e.self_cpu_time_total
        phase = _phase_at(phases, e.time_range.start)
        if phase:
            row[f"{phase}_ms"] += total
        if device:
            row["device_ms"] += _get(e, "device_time_total", "cuda_time_total")
    return [_rounded(rows[i]) for i in sorted(rows)]


def _empty_row(index: int, device: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"layer": index, "calls": 0, "total_ms": 0.0, "self_ms": 0.0}
    row.update({f"{phase}_ms": 0.0 for phase in PHASES})
    row["device_ms"] = 0.0 if device else None
    return row


def _phase_at(phases: list[tuple[str, int, int]], start: float) -> str | None:
    for name, begin, end in phases:
        if begin <= start <= end:
            return name
    return None


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _ms(v) if k.endswith("_ms") and v is not None else v for k, v in row.items()}


def operator_rows(averages) -> list[dict[str, Any]]:
    """Every profiled operator (kvscope's own ranges and other annotations left out), as plain numbers."""
    rows = []
    for e in averages:
        if not _is_cpu(e) or e.key.startswith(PREFIX) or _get(e, "is_user_annotation", default=False):
            continue
        rows.append({
            "name": e.key,
            "calls": e.count,
            "self_cpu_ms": _ms(e.self_cpu_time_total),
            "cpu_total_ms": _ms(e.cpu_time_total),
            "self_device_ms": _ms(_get(e, "self_device_time_total", "self_cuda_time_total")),
            "device_total_ms": _ms(_get(e, "device_time_total", "cuda_time_total")),
            "self_cpu_memory_bytes": int(e.self_cpu_memory_usage),
            "self_device_memory_bytes": int(_get(e, "self_device_memory_usage", "self_cuda_memory_usage")),
        })
    return rows


def top_by_time(rows: list[dict[str, Any]], top: int, device: bool) -> list[dict[str, Any]]:
    """Operators by self time: device (kernel) time on CUDA, where CPU time is mostly launch overhead; else CPU."""
    key = "self_device_ms" if device else "self_cpu_ms"
    return sorted(rows, key=lambda r: (-r[key], r["name"]))[:top]


def top_by_memory(rows: list[dict[str, Any]], top: int, device: bool) -> list[dict[str, Any]]:
    """Operators by self memory (bytes they allocated and did not free themselves): device memory on CUDA, else CPU.

    Only operators that kept memory are listed; a negative self figure means an operator freed more than it took."""
    key = "self_device_memory_bytes" if device else "self_cpu_memory_bytes"
    kept = [r for r in rows if r[key] > 0]
    return sorted(kept, key=lambda r: (-r[key], r["name"]))[:top]

