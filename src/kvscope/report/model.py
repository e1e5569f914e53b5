"""The doctor's report as typed data: what report.json holds, what report.html shows.

`to_dict()` is the one serialisation (report.json); `from_dict()` the one way back, for a report.json read from disk
or built by hand: it keeps the fields it knows and coerces each to its type, so a missing key, a NaN or text where a
number belongs becomes None here, once, and never reaches the page.

>>> r = DoctorReport.from_dict({"outcome": {"status": "oom", "seconds": float("nan")}, "notes": ["a", None]})
>>> r.outcome.status, r.outcome.seconds, r.notes
('oom', None, ['a'])
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Union


@dataclass
class ModelInfo:
    name: str | None = None
    num_layers: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    weights_bytes: int | None = None


@dataclass
class DeviceInfo:
    name: str | None = None
    cuda: bool | None = None
    total_bytes: int | None = None
    capacity_bytes: int | None = None
    emulated: bool | None = None


@dataclass
class RunOutcome:
    """How a run ended: status "ok", "oom" or "error"; `detail` the cause ("kv_budget_exceeded"...)."""

    status: str | None = None
    detail: str | None = None
    error: str | None = None
    cache_error: str | None = None
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    peak_rss_bytes: int | None = None
    seconds: float | None = None
    kv_bytes: int | None = None
    evicted_tokens: int | None = None
    decode_tokens_per_second: float | None = None
    at_failure: dict | None = None
    failed_at: float | None = None
    failed_in: str | None = None
    held_tokens: int | None = None


@dataclass
class Figure:
    """One headline figure: a labelled number of bytes or tokens with a line saying what it is."""

    label: str | None = None
    bytes: int | None = None
    tokens: int | None = None
    detail: str | None = None


@dataclass
class Diagnosis:
    headline: str | None = None
    explanation: str | None = None
    figures: list[Figure] = field(default_factory=list)
    needed_bytes: int | None = None
    available_bytes: int | None = None
    held_bytes: int | None = None
    option: str | None = None
    recommend_expandable_segments: bool | None = None


@dataclass
class Check:
    """The applied fix's outcome against its own estimate."""

    what: str | None = None
    estimate_bytes: int | None = None
    measured_bytes: int | None = None
    agrees: bool | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class FixOutcome:
    applied: str | None = None
    option: str | None = None
    command: str | None = None
    status: str | None = None
    detail: str | None = None
    error: str | None = None
    peak_allocated_bytes: int | None = None
    peak_rss_bytes: int | None = None
    kv_bytes: int | None = None
    evicted_tokens: int | None = None
    seconds: float | None = None
    failed_at: float | None = None
    workload: dict = field(default_factory=dict)
    kv_layers: list[dict] = field(default_factory=list)
    decode_tokens_per_second: float | None = None
    check: Check | None = None


@dataclass
class Phase:
    name: str | None = None
    start: float | None = None
    end: float | None = None
    detail: str | None = None


@dataclass
class KVLayer:
    layer: int | None = None
    stored_tokens: int | None = None
    evicted_tokens: int | None = None
    bytes: int | None = None
    capacity_tokens: int | None = None


@dataclass
class Timeline:
    """Samples on the monitor's clock: seconds, and bytes (None where a sample is missing)."""

    t: list[float | None] = field(default_factory=list)
    allocated: list[float | None] = field(default_factory=list)
    reserved: list[float | None] = field(default_factory=list)
    peak: list[float | None] = field(default_factory=list)
    nvml_used: list[float | None] | None = None
    gpu_util: list[float | None] | None = None
    rss: list[float | None] = field(default_factory=list)
    cpu_percent: list[float | None] = field(default_factory=list)


@dataclass
class KVTimeline:
    t: list[float | None] = field(default_factory=list)
    bytes: list[float | None] = field(default_factory=list)
    stored_tokens: list[float | None] = field(default_factory=list)


@dataclass
class Evictions:
    t: list[float | None] = field(default_factory=list)
    evicted_tokens: list[float | None] = field(default_factory=list)


@dataclass
class DoctorReport:
    """Everything one `kvscope doctor` run found (the keys of report.json)."""

    kvscope_version: str | None = None
    created: str | None = None
    command: str | None = None
    model: ModelInfo = field(default_factory=ModelInfo)
    workload: dict = field(default_factory=dict)  # Workload fields, kv_tokens, policy and kv_budget_bytes
    device: DeviceInfo = field(default_factory=DeviceInfo)
    prediction: dict = field(default_factory=dict)  # the planner's Plan.to_dict()
    outcome: RunOutcome = field(default_factory=RunOutcome)
    kv_layers: list[KVLayer] = field(default_factory=list)
    kv_layers_workload: dict = field(default_factory=dict)  # the workload the per-layer rows come from
    attribution: dict = field(default_factory=dict)  # weights / kv_cache / activations / other / fragmentation
    diagnosis: Diagnosis | None = None
    fixes: list[dict] = field(default_factory=list)  # planner.advice.Fix.to_dict() of each ranked fix
    fix_outcome: FixOutcome | None = None
    snapshot: str | None = None
    notes: list[str] = field(default_factory=list)
    timeline: Timeline = field(default_factory=Timeline)
    phases: list[Phase] = field(default_factory=list)
    evictions: Evictions = field(default_factory=Evictions)
    kv_timeline: KVTimeline = field(default_factory=KVTimeline)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> DoctorReport:
        return _load(cls, data)


def number(value: Any) -> float | None:
    """A finite number, or None for anything else (None, NaN, text, booleans)."""
    if value is None or isinstance(value, (bool, str, bytes)):
        return None
    try:
        f = float(value)  # ints, floats and numpy scalars
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _load(tp: Any, value: Any) -> Any:
    """`value` as type `tp` (a dataclass, list[...], X | None, dict, str, bool, int or float), or its empty value."""
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        given = value if isinstance(value, dict) else {}
        return tp(**{f.name: _load(hints[f.name], given[f.name]) for f in dataclasses.fields(tp) if f.name in given})
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        return None if value is None or (origin is not list and _empty(inner, value)) else _load(inner, value)
    if origin is list:
        items = [_load(args[0], v) for v in value] if isinstance(value, (list, tuple)) else []
        return [v for v in items if v is not None] if args[0] is str else items
    if tp is dict or origin is dict:
        return dict(value) if isinstance(value, dict) else {}
    if tp is str:
        return None if value is None else str(value)
    if tp is bool:
        return value if isinstance(value, bool) else None
    if tp in (int, float):
        return number(value)
    return value


def _empty(tp: Any, value: Any) -> bool:
    """Whether a value for an optional `tp` is to be read as missing (a dataclass given something not a dict)."""
    return dataclasses.is_dataclass(tp) and not isinstance(value, dict)
