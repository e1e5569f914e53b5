"""The report's hand-drawn SVG: small value helpers, scales and axes (no matplotlib; the page loads nothing)."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kvscope.planner.sizes import format_bytes

MAX_POINTS = 1500  # per line; longer series are reduced to per-bucket min and max, so peaks survive

_COLORS = {
    "allocated": "#1f6fb4",
    "reserved": "#e3780c",
    "nvml_used": "#2a9d3a",
    "rss": "#8456b8",
    "capacity": "#c8283b",
    "kv_budget": "#b8860b",
    "stored": "#1f6fb4",
    "evicted": "#e3780c",
    "weights": "#4c72b0",
    "kv_cache": "#dd8452",
    "activations": "#55a868",
    "other": "#8172b3",
    "fragmentation": "#a9a9a9",
}
_PHASE_FILLS = ("#4c72b0", "#55a868", "#dd8452", "#8172b3", "#937860", "#da8bc3")
_ATTRIBUTION = (
    ("weights", "weights"),
    ("kv_cache", "KV cache"),
    ("activations", "activations"),
    ("other", "other"),
    ("fragmentation", "fragmentation"),
)

# plot geometry (SVG user units; the SVG scales to the page width). Text colours go in style="" because the page's
# CSS for svg text would override presentation attributes such as fill=.
_W = 960
_LEFT, _RIGHT, _TOP, _BOTTOM = 84, 24, 40, 52


# --------------------------------------------------------------------------------------------------------------------
# small helpers


def _e(value: Any) -> str:
    """Escaped text for element content and quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else []


def _num(value: Any) -> float | None:
    """A finite number, or None for anything else (None, NaN, text, booleans)."""
    if value is None or isinstance(value, (bool, str, bytes)):
        return None
    try:
        f = float(value)  # ints, floats and numpy scalars
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _bytes(value: Any) -> str:
    n = _num(value)
    return "—" if n is None else format_bytes(n)


def _int(value: Any) -> str:
    n = _num(value)
    return "—" if n is None else f"{round(n):,}"


def _seconds(value: Any) -> str:
    n = _num(value)
    if n is None:
        return "—"
    return f"{n:.2f} s" if n < 100 else f"{n:.0f} s"


def _yes_no(value: Any) -> str:
    if value is None:
        return '<span class="muted">—</span>'
    return '<span class="yes">yes</span>' if value else '<span class="no">no</span>'


def _badge(status: Any, detail: Any = None) -> str:
    text = str(status or "unknown").strip().lower()
    kind = {"ok": "ok", "oom": "oom", "error": "error"}.get(text, "unknown")
    if detail == "kv_budget_exceeded":  # the workload outgrew its budget: a does-not-fit, not a failure of kvscope
        kind, text = "oom", "kv budget exceeded"
    return f'<span class="badge badge-{kind}">{_e(text.upper())}</span>'


def _no_data(plot_id: str, reason: str) -> str:
    return f'<p class="no-data" id="{plot_id}">no data: {_e(reason)}</p>'


def _fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100 or float(v).is_integer():
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _fmt_tokens(v: float) -> str:
    if abs(v) >= 1e6:
        return f"{v / 1e6:.3g}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.3g}k"
    return _fmt_tick(v)


def _nice_ticks(hi: float, n: int = 5) -> tuple[list[float], float]:
    """Ticks from 0 to at least `hi` at a 1/2/2.5/5 x 10^k step; returns (ticks, top)."""
    if not hi or hi <= 0:
        hi = 1.0
    raw = hi / n
    mag = 10 ** math.floor(math.log10(raw))
    step = mag
    for m in (1, 2, 2.5, 5, 10):
        step = m * mag
        if hi / step <= n:
            break
    count = math.ceil(hi / step - 1e-9)
    ticks = [i * step for i in range(count + 1)]
    return ticks, ticks[-1]


def _byte_unit(hi: float) -> tuple[str, float]:
    for unit, size in (("TiB", 1024.0**4), ("GiB", 1024.0**3), ("MiB", 1024.0**2), ("KiB", 1024.0)):
        if hi >= size:
            return unit, size
    return "B", 1.0


class _Scale:
    """Linear map from data values [lo, hi] to pixels [p0, p1]."""

    def __init__(self, lo: float, hi: float, p0: float, p1: float) -> None:
        self.lo, self.hi, self.p0, self.p1 = lo, (hi if hi > lo else lo + 1.0), p0, p1

    def __call__(self, v: float) -> float:
        return self.p0 + (v - self.lo) / (self.hi - self.lo) * (self.p1 - self.p0)


def _pairs(xs: Sequence[Any], ys: Sequence[Any]) -> list[tuple[float, float] | None]:
    """(x, y) points; None marks a gap (a missing or non-finite sample)."""
    out: list[tuple[float, float] | None] = []
    for x, y in zip(xs, ys):
        fx, fy = _num(x), _num(y)
        out.append(None if fx is None or fy is None else (fx, fy))
    return out


def _decimate(points: list[tuple[float, float] | None], limit: int = MAX_POINTS) -> list[tuple[float, float] | None]:
    """At most about `limit` points: each bucket keeps its first, min, max and last sample in time order."""
    if len(points) <= limit:
        return points
    size = math.ceil(len(points) / (limit / 4))
    out: list[tuple[float, float] | None] = []
    for start in range(0, len(points), size):
        bucket = points[start : start + size]
        if any(p is None for p in bucket):
            out.extend(bucket[:1] + [None] + bucket[-1:])
            continue
        real = [p for p in bucket if p is not None]
        keep = {0, len(real) - 1, min(range(len(real)), key=lambda i: real[i][1]),
                max(range(len(real)), key=lambda i: real[i][1])}
        out.extend(real[i] for i in sorted(keep))
    return out


def _polylines(points: list[tuple[float, float] | None], sx: _Scale, sy: _Scale, attrs: str) -> list[str]:
    """One `<polyline>` per unbroken run of points."""
    runs: list[list[tuple[float, float]]] = [[]]
    for p in points:
        if p is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(p)
    lines = []
    for run in runs:
        if not run:
            continue
        if len(run) == 1:  # a lone sample still shows, as a short tick
            run = [run[0], (run[0][0], run[0][1])]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in run)
        lines.append(f'<polyline points="{coords}" {attrs}/>')
    return lines


# --------------------------------------------------------------------------------------------------------------------
# SVG building blocks


def _svg_open(plot_id: str, title: str, height: int) -> str:
    return (
        f'<svg id="{plot_id}" class="plot" viewBox="0 0 {_W} {height}" width="{_W}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img" aria-labelledby="{plot_id}-title" '
        f'preserveAspectRatio="xMidYMid meet">'
        f'<title id="{plot_id}-title">{_e(title)}</title>'
    )


def _y_axis(sy: _Scale, ticks: Iterable[float], label_of: Callable[[float], str], label: str,
            x0: float, x1: float, top: float, bottom: float) -> list[str]:
    parts = ['<g class="axis y-axis">']
    for v in ticks:
        y = sy(v)
        parts.append(f'<line class="grid" x1="{x0:.1f}" y1="{y:.1f}" x2="{x1:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text x="{x0 - 6:.1f}" y="{y + 4:.1f}" text-anchor="end">{_e(label_of(v))}</text>')
    parts.append(f'<line class="axis-line" x1="{x0:.1f}" y1="{top:.1f}" x2="{x0:.1f}" y2="{bottom:.1f}"/>')
    mid = (top + bottom) / 2
    parts.append(f'<text class="axis-label" x="18" y="{mid:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 18 {mid:.1f})">{_e(label)}</text>')
    parts.append("</g>")
    return parts


def _x_axis(sx: _Scale, ticks: Iterable[float], label_of: Callable[[float], str], label: str,
            y0: float, x0: float, x1: float, height: int) -> list[str]:
    parts = ['<g class="axis x-axis">']
    for v in ticks:
        x = sx(v)
        parts.append(f'<line class="tick" x1="{x:.1f}" y1="{y0:.1f}" x2="{x:.1f}" y2="{y0 + 5:.1f}"/>')
        parts.append(f'<text x="{x:.1f}" y="{y0 + 18:.1f}" text-anchor="middle">{_e(label_of(v))}</text>')
    parts.append(f'<line class="axis-line" x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y0:.1f}"/>')
    parts.append(f'<text class="axis-label" x="{(x0 + x1) / 2:.1f}" y="{height - 8}" '
                 f'text-anchor="middle">{_e(label)}</text>')
    parts.append("</g>")
    return parts


def _legend(items: list[tuple[str, str, str]], y: float = 16) -> list[str]:
    """items: (label, color, kind) with kind 'line', 'dash' or 'box'; laid out left to right above the plot."""
    parts = ['<g class="legend">']
    x = float(_LEFT)
    for label, color, kind in items:
        if kind == "box":
            parts.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="14" height="10" fill="{color}"/>')
        else:
            dash = ' stroke-dasharray="6 4"' if kind == "dash" else ""
            parts.append(f'<line x1="{x:.1f}" y1="{y - 4:.1f}" x2="{x + 18:.1f}" y2="{y - 4:.1f}" '
                         f'stroke="{color}" stroke-width="2.5"{dash}/>')
        parts.append(f'<text x="{x + 24:.1f}" y="{y:.1f}">{_e(label)}</text>')
        x += 24 + 7.2 * len(label) + 22
    parts.append("</g>")
    return parts
