"""Render a doctor report dict as one self-contained HTML page.

The page needs nothing but itself: no scripts, no external CSS or fonts, no network. Plots are inline SVG drawn here
(no matplotlib). Every piece of text from the report is escaped. Every optional key may be missing or None; a plot
with nothing to draw shows a short "no data: <reason>" paragraph under the plot's id instead of an empty SVG.

>>> page = render_html({"diagnosis": {"headline": "<b>too big</b>"}})
>>> "&lt;b&gt;too big&lt;/b&gt;" in page and "<b>too big" not in page
True
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import quote

from kvscope.planner.sizes import format_bytes

PLOT_IDS = ("plot-timeline", "plot-kv-layers", "plot-evictions", "plot-attribution")
MEMORY_VIZ_URL = "https://pytorch.org/memory_viz"
MAX_POINTS = 1500  # per line; longer series are reduced to per-bucket min and max, so peaks survive

_COLORS = {
    "allocated": "#1f6fb4",
    "reserved": "#e3780c",
    "nvml_used": "#2a9d3a",
    "rss": "#8456b8",
    "capacity": "#c8283b",
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


def _badge(status: Any) -> str:
    text = str(status or "unknown").strip().lower()
    kind = {"ok": "ok", "oom": "oom", "error": "error"}.get(text, "unknown")
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


# --------------------------------------------------------------------------------------------------------------------
# plots


def _timeline_plot(report: dict) -> str:
    pid = "plot-timeline"
    tl = _dict(report.get("timeline"))
    t = _list(tl.get("t"))
    if not t:
        return _no_data(pid, "no memory samples were recorded")
    series = []
    for key, label in (("allocated", "allocated"), ("reserved", "reserved"), ("nvml_used", "NVML used"),
                       ("rss", "process RSS (host)")):
        pts = _pairs(t, _list(tl.get(key)))
        if any(p is not None for p in pts):
            series.append((key, label, _decimate(pts)))
    if not series:
        return _no_data(pid, "the timeline has times but no memory samples (allocated, reserved, NVML or RSS)")

    device = _dict(report.get("device"))
    capacity = _num(device.get("capacity_bytes")) or _num(_dict(report.get("prediction")).get("capacity_bytes"))
    phases = [p for p in _list(report.get("phases")) if isinstance(p, dict)]
    outcome = _dict(report.get("outcome"))

    xs = [p[0] for _, _, pts in series for p in pts if p is not None]
    ys = [p[1] for _, _, pts in series for p in pts if p is not None]
    t_lo = min(0.0, min(xs))
    t_hi = max(xs)
    for ph in phases:
        end = _num(ph.get("end"))
        if end is not None:
            t_hi = max(t_hi, end)
    if t_hi <= t_lo:
        t_hi = t_lo + 1.0
    y_hi = max(max(ys), capacity or 0.0) * 1.04
    unit, size = _byte_unit(y_hi)
    yticks, ytop = _nice_ticks(y_hi / size, 6)
    xticks, xtop = _nice_ticks(t_hi - t_lo, 8)
    xticks = [t_lo + v for v in xticks]

    height = 380
    x0, x1, top, bottom = _LEFT, _W - _RIGHT, _TOP, height - _BOTTOM
    sx = _Scale(t_lo, t_lo + xtop, x0, x1)
    sy = _Scale(0.0, ytop * size, bottom, top)

    parts = [_svg_open(pid, "Memory over time", height)]
    # phase bands first, so lines draw over them
    parts.append('<g class="phases">')
    for i, ph in enumerate(phases):
        start, end = _num(ph.get("start")), _num(ph.get("end"))
        if start is None or end is None or end < start:
            continue
        xa, xb = sx(max(start, t_lo)), sx(min(end, t_lo + xtop))
        fill = _PHASE_FILLS[i % len(_PHASE_FILLS)]
        name = str(ph.get("name") or f"phase {i + 1}")
        tip = f"{name}: {start:.2f}–{end:.2f} s" + (f" — {ph['detail']}" if ph.get("detail") else "")
        parts.append(f'<rect class="phase" x="{xa:.1f}" y="{top}" width="{max(xb - xa, 1.0):.1f}" '
                     f'height="{bottom - top}" fill="{fill}" fill-opacity="0.10"><title>{_e(tip)}</title></rect>')
        parts.append(f'<line x1="{xa:.1f}" y1="{top}" x2="{xa:.1f}" y2="{bottom}" stroke="{fill}" '
                     f'stroke-opacity="0.5" stroke-dasharray="2 3"/>')
        if xb - xa >= 7 * len(name) + 8:
            parts.append(f'<text class="phase-label halo" x="{xa + 5:.1f}" y="{top + 14}" style="fill:{fill}">'
                         f'{_e(name)}</text>')
    parts.append("</g>")
    parts += _y_axis(sy, [v * size for v in yticks], lambda v: _fmt_tick(v / size), f"memory ({unit})",
                     x0, x1, top, bottom)
    parts += _x_axis(sx, xticks, _fmt_tick, "time (s)", bottom, x0, x1, height)

    legend = [(label, _COLORS[key], "line") for key, label, _ in series]
    draw_order = ("nvml_used", "rss", "reserved", "allocated")  # allocated last, on top of the lines near it
    for key, label, pts in sorted(series, key=lambda s: draw_order.index(s[0])):
        color = _COLORS[key]
        peak = max(p[1] for p in pts if p is not None)
        parts.append(f'<g class="series series-{key}"><title>{_e(label)}: peak {_e(format_bytes(peak))}</title>')
        parts += _polylines(pts, sx, sy, f'fill="none" stroke="{color}" stroke-width="2" '
                                         f'stroke-linejoin="round"')
        parts.append("</g>")
    if capacity:
        y = sy(capacity)
        text = f"capacity {format_bytes(capacity)}"
        parts.append(f'<g class="capacity"><title>{_e(text)}</title>'
                     f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="{_COLORS["capacity"]}" '
                     f'stroke-width="1.5" stroke-dasharray="6 4"/>'
                     f'<text class="halo" x="{x0 + 6}" y="{y - 5:.1f}" style="fill:{_COLORS["capacity"]}">'
                     f'{_e(text)}</text></g>')
        legend.append(("capacity", _COLORS["capacity"], "dash"))
    status = str(outcome.get("status") or "").lower()
    if status in ("oom", "error"):
        x = sx(max(xs))
        label = "OOM" if status == "oom" else "error"
        parts.append(f'<g class="failure"><line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" '
                     f'stroke="{_COLORS["capacity"]}" stroke-width="1.5"/>'
                     f'<text class="halo" x="{x - 4:.1f}" y="{top + 30}" text-anchor="end" '
                     f'style="fill:{_COLORS["capacity"]};font-weight:700">{_e(label)}</text></g>')
    parts += _legend(legend)
    parts.append("</svg>")

    rows = []
    for ph in phases:
        start, end = _num(ph.get("start")), _num(ph.get("end"))
        span = "—" if start is None or end is None else f"{start:.2f}–{end:.2f} s"
        rows.append(f"<li><b>{_e(ph.get('name') or 'phase')}</b> {_e(span)}"
                    + (f" — {_e(ph.get('detail'))}" if ph.get("detail") else "") + "</li>")
    phase_list = f'<ul class="phases-list">{"".join(rows)}</ul>' if rows else ""
    return "".join(parts) + phase_list


def _kv_layers_plot(report: dict) -> str:
    pid = "plot-kv-layers"
    layers = [row for row in _list(report.get("kv_layers")) if isinstance(row, dict)]
    if not layers:
        return _no_data(pid, "no per-layer KV cache statistics were recorded")
    data = []
    for i, row in enumerate(layers):
        layer = _num(row.get("layer"))
        data.append((int(layer) if layer is not None else i, _num(row.get("stored_tokens")) or 0.0,
                     _num(row.get("evicted_tokens")) or 0.0, _num(row.get("bytes")),
                     _num(row.get("capacity_tokens"))))
    tallest = max(max(s + e for _, s, e, _, _ in data), max((c or 0.0) for *_, c in data))
    if tallest <= 0:
        return _no_data(pid, "the KV cache held no tokens and evicted none")

    height = 340
    x0, x1, top, bottom = _LEFT, _W - _RIGHT, _TOP, height - _BOTTOM
    yticks, ytop = _nice_ticks(tallest * 1.04, 5)
    sy = _Scale(0.0, ytop, bottom, top)
    n = len(data)
    slot = (x1 - x0) / n
    bar = max(slot * 0.72, 1.0)

    parts = [_svg_open(pid, "KV cache tokens per layer", height)]
    parts += _y_axis(sy, yticks, _fmt_tokens, "tokens", x0, x1, top, bottom)
    every = max(1, math.ceil(n / 32))
    parts.append('<g class="axis x-axis">')
    for i, (layer, *_rest) in enumerate(data):
        if i % every == 0 or i == n - 1:
            cx = x0 + slot * (i + 0.5)
            parts.append(f'<text x="{cx:.1f}" y="{bottom + 16}" text-anchor="middle">{layer}</text>')
    parts.append(f'<line class="axis-line" x1="{x0}" y1="{bottom}" x2="{x1}" y2="{bottom}"/>')
    parts.append(f'<text class="axis-label" x="{(x0 + x1) / 2:.1f}" y="{height - 8}" text-anchor="middle">'
                 f'layer</text></g>')
    parts.append('<g class="bars">')
    for i, (layer, stored, evicted, nbytes, cap) in enumerate(data):
        bx = x0 + slot * i + (slot - bar) / 2
        tip = (f"layer {layer}: {stored:,.0f} stored tokens"
               + (f" ({format_bytes(nbytes)})" if nbytes is not None else "")
               + f", {evicted:,.0f} evicted"
               + (f", capacity {cap:,.0f} tokens" if cap else ""))
        y_stored = sy(stored)
        y_total = sy(stored + evicted)
        parts.append(f'<g class="layer"><title>{_e(tip)}</title>')
        if stored > 0:
            parts.append(f'<rect class="stored" x="{bx:.1f}" y="{y_stored:.1f}" width="{bar:.1f}" '
                         f'height="{bottom - y_stored:.1f}" fill="{_COLORS["stored"]}"/>')
        if evicted > 0:
            parts.append(f'<rect class="evicted" x="{bx:.1f}" y="{y_total:.1f}" width="{bar:.1f}" '
                         f'height="{y_stored - y_total:.1f}" fill="{_COLORS["evicted"]}" fill-opacity="0.85"/>')
        if cap:
            yc = sy(cap)
            parts.append(f'<line class="capacity" x1="{bx - 1:.1f}" y1="{yc:.1f}" x2="{bx + bar + 1:.1f}" '
                         f'y2="{yc:.1f}" stroke="#222" stroke-width="2"/>')
        parts.append("</g>")
    parts.append("</g>")
    legend = [("stored tokens", _COLORS["stored"], "box"), ("evicted tokens", _COLORS["evicted"], "box")]
    if any(c for *_, c in data):
        legend.append(("capacity (tokens)", "#222", "line"))
    parts += _legend(legend)
    parts.append("</svg>")
    total_bytes = sum(b for *_, b, _ in data if b is not None)
    summary = (f'<p class="caption">{n} layers; {_e(f"{sum(s for _, s, *_ in data):,.0f}")} stored tokens in all'
               + (f" ({_e(format_bytes(total_bytes))})" if total_bytes else "")
               + f"; {_e(f'{sum(e for _, _, e, *_ in data):,.0f}')} evicted. Hover a bar for its bytes.</p>")
    return "".join(parts) + summary


def _evictions_plot(report: dict) -> str:
    pid = "plot-evictions"
    ev = _dict(report.get("evictions"))
    pts = _pairs(_list(ev.get("t")), _list(ev.get("evicted_tokens")))
    real = [p for p in pts if p is not None]
    workload = _dict(report.get("workload"))
    if not real or max(p[1] for p in real) <= 0:
        policy = workload.get("policy")
        why = f"policy {policy}" if policy else "no eviction policy (the full cache is kept)"
        return _no_data(pid, f"no tokens were evicted ({why})")
    pts = _decimate(pts)
    t_lo = min(0.0, min(p[0] for p in real))
    t_hi = max(p[0] for p in real)
    for ph in _list(report.get("phases")):
        end = _num(_dict(ph).get("end"))
        if end is not None:
            t_hi = max(t_hi, end)
    if t_hi <= t_lo:
        t_hi = t_lo + 1.0
    y_hi = max(p[1] for p in real)
    height = 300
    x0, x1, top, bottom = _LEFT, _W - _RIGHT, _TOP, height - _BOTTOM
    yticks, ytop = _nice_ticks(y_hi * 1.04, 5)
    xticks, xtop = _nice_ticks(t_hi - t_lo, 8)
    sx = _Scale(t_lo, t_lo + xtop, x0, x1)
    sy = _Scale(0.0, ytop, bottom, top)

    # cumulative counts change in steps: draw them as a step function
    steps: list[tuple[float, float] | None] = []
    prev: tuple[float, float] | None = None
    for p in pts:
        if p is not None and prev is not None:
            steps.append((p[0], prev[1]))
        steps.append(p)
        prev = p
    parts = [_svg_open(pid, "Evicted tokens over time (cumulative)", height)]
    parts += _y_axis(sy, yticks, _fmt_tokens, "evicted tokens (cumulative)", x0, x1, top, bottom)
    parts += _x_axis(sx, [t_lo + v for v in xticks], _fmt_tick, "time (s)", bottom, x0, x1, height)
    run = [p for p in steps if p is not None]
    area = (f"{sx(run[0][0]):.1f},{bottom} " + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in run)
            + f" {sx(run[-1][0]):.1f},{bottom}")
    parts.append(f'<polygon class="area" points="{area}" fill="{_COLORS["evicted"]}" fill-opacity="0.15"/>')
    last = real[-1]
    parts.append(f'<g class="series"><title>{_e(f"{last[1]:,.0f} tokens evicted by {last[0]:.2f} s")}</title>')
    parts += _polylines(steps, sx, sy, f'fill="none" stroke="{_COLORS["evicted"]}" stroke-width="2"')
    parts.append(f'<circle cx="{sx(last[0]):.1f}" cy="{sy(last[1]):.1f}" r="3.5" fill="{_COLORS["evicted"]}"/>')
    lx, ly = min(sx(last[0]) + 6, x1 - 4), sy(last[1]) - 6
    parts.append(f'<text class="halo" x="{lx:.1f}" y="{ly:.1f}" text-anchor="end">{_e(f"{last[1]:,.0f}")}</text></g>')
    parts += _legend([("evicted tokens (cumulative)", _COLORS["evicted"], "line")])
    parts.append("</svg>")
    return "".join(parts)


def _attribution_plot(report: dict) -> str:
    pid = "plot-attribution"
    attr = _dict(report.get("attribution"))
    items = [(key, label, _num(attr.get(key)) or 0.0) for key, label in _ATTRIBUTION]
    items = [(k, lab, max(v, 0.0)) for k, lab, v in items]
    total = sum(v for *_, v in items)
    if total <= 0:
        return _no_data(pid, "no memory attribution was computed")
    capacity = _num(_dict(report.get("device")).get("capacity_bytes"))
    hi = max(total, capacity or 0.0) * 1.02
    unit, size = _byte_unit(hi)
    ticks, top_v = _nice_ticks(hi / size, 8)
    height = 170
    x0, x1, top, bottom = _LEFT, _W - _RIGHT, _TOP + 8, 110
    sx = _Scale(0.0, top_v * size, x0, x1)

    parts = [_svg_open(pid, "Where the memory went", height)]
    parts += _x_axis(sx, [v * size for v in ticks], lambda v: _fmt_tick(v / size), f"memory ({unit})",
                     bottom, x0, x1, height)
    parts.append('<g class="bars">')
    x = 0.0
    for key, label, value in items:
        if value <= 0:
            continue
        xa, xb = sx(x), sx(x + value)
        tip = f"{label}: {format_bytes(value)} ({value / total:.1%})"
        parts.append(f'<rect class="segment segment-{key}" x="{xa:.1f}" y="{top}" width="{max(xb - xa, 0.5):.1f}" '
                     f'height="{bottom - top - 10}" fill="{_COLORS[key]}"><title>{_e(tip)}</title></rect>')
        short = format_bytes(value)
        if xb - xa > 7 * len(short) + 10:
            parts.append(f'<text class="on-bar" x="{(xa + xb) / 2:.1f}" y="{(top + bottom - 10) / 2 + 4:.1f}" '
                         f'text-anchor="middle">{_e(short)}</text>')
        x += value
    parts.append("</g>")
    parts.append(f'<text class="axis-label" x="{x0 - 8}" y="{(top + bottom - 10) / 2 + 4:.1f}" '
                 f'text-anchor="end">peak</text>')
    legend = [(label, _COLORS[key], "box") for key, label, v in items if v > 0]
    if capacity:
        xc = sx(capacity)
        text = f"capacity {format_bytes(capacity)}"
        parts.append(f'<g class="capacity"><title>{_e(text)}</title><line x1="{xc:.1f}" y1="{top - 6}" '
                     f'x2="{xc:.1f}" y2="{bottom}" stroke="{_COLORS["capacity"]}" stroke-width="2" '
                     f'stroke-dasharray="6 4"/></g>')
        legend.append(("capacity", _COLORS["capacity"], "dash"))
    parts += _legend(legend)
    parts.append("</svg>")

    rows = "".join(
        f'<tr><td><span class="swatch" style="background:{_COLORS[key]}"></span>{_e(label)}</td>'
        f'<td class="num">{_e(format_bytes(value))}</td><td class="num">{value / total:.1%}</td></tr>'
        for key, label, value in items
    )
    cap_row = ""
    if capacity:
        cap_row = (f'<tr class="total"><td>capacity</td><td class="num">{_e(format_bytes(capacity))}</td>'
                   f'<td class="num">{total / capacity:.1%} used</td></tr>')
    table = (f'<table class="compact"><thead><tr><th>part</th><th>bytes</th><th>share</th></tr></thead><tbody>'
             f'{rows}<tr class="total"><td>total</td><td class="num">{_e(format_bytes(total))}</td>'
             f'<td class="num">100%</td></tr>{cap_row}</tbody></table>')
    return "".join(parts) + table


# --------------------------------------------------------------------------------------------------------------------
# sections


def _header(report: dict) -> str:
    model = _dict(report.get("model"))
    w = _dict(report.get("workload"))
    dev = _dict(report.get("device"))
    outcome = _dict(report.get("outcome"))
    name = model.get("name") or "unknown model"

    workload_bits = []
    if w.get("batch") is not None or w.get("context") is not None:
        workload_bits.append(f"batch {_int(w.get('batch'))} × context {_int(w.get('context'))}"
                             + (f" + {_int(w.get('new_tokens'))} new tokens" if w.get("new_tokens") is not None
                                else ""))
    for key, label in (("runtime", "runtime"), ("kv_dtype", "KV dtype")):
        if w.get(key):
            workload_bits.append(f"{label} {w[key]}")
    if w.get("policy"):
        workload_bits.append(f"policy {w['policy']}")
    if w.get("budget_tokens") is not None:
        workload_bits.append(f"budget {_int(w.get('budget_tokens'))} tokens")

    dev_bits = [str(dev.get("name") or "unknown device")]
    if dev.get("cuda") is False:
        dev_bits.append("no CUDA")
    if dev.get("capacity_bytes") is not None:
        dev_bits.append(f"capacity {_bytes(dev.get('capacity_bytes'))}"
                        + (" (emulated)" if dev.get("emulated") else ""))
    if dev.get("total_bytes") is not None and dev.get("total_bytes") != dev.get("capacity_bytes"):
        dev_bits.append(f"total {_bytes(dev.get('total_bytes'))}")

    layers = f" · {_int(model.get('num_layers'))} layers" if model.get("num_layers") is not None else ""
    rows = [
        ("model", f"{name}{layers}"),
        ("workload", " · ".join(workload_bits) or "—"),
        ("device", " · ".join(dev_bits)),
        ("run time", _seconds(outcome.get("seconds"))),
    ]
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows)
    error = ""
    if outcome.get("error"):
        error = f'<pre class="error">{_e(outcome.get("error"))}</pre>'
    return (f'<header><div class="title-row"><h1>kvscope doctor: {_e(name)}</h1>{_badge(outcome.get("status"))}'
            f'</div><dl class="meta">{dl}</dl>{error}</header>')


def _diagnosis(report: dict) -> str:
    d = _dict(report.get("diagnosis"))
    if not d:
        return '<section id="diagnosis"><h2>Diagnosis</h2><p class="muted">no diagnosis was made</p></section>'
    needed, available, estimate = (_num(d.get(k)) for k in ("needed_bytes", "available_bytes", "estimate_bytes"))
    cards = []
    for label, value in (("needed", needed), ("available", available), ("estimate after the fix", estimate)):
        if value is not None:
            cards.append(f'<div class="figure"><div class="figure-label">{_e(label)}</div>'
                         f'<div class="figure-value">{_e(format_bytes(value))}</div></div>')
    if needed is not None and available is not None and needed > available:
        cards.append(f'<div class="figure short"><div class="figure-label">short by</div>'
                     f'<div class="figure-value">{_e(format_bytes(needed - available))}</div></div>')
    extra = ""
    if d.get("option"):
        extra += f'<p class="fix-option">Change: <code>{_e(d.get("option"))}</code></p>'
    if d.get("recommend_expandable_segments"):
        extra += ('<p class="hint">Fragmentation is large: set <code>PYTORCH_CUDA_ALLOC_CONF=expandable_segments:'
                  'True</code> so freed blocks can be reused for larger tensors.</p>')
    status = str(_dict(report.get("outcome")).get("status") or "").lower()
    kind = {"ok": "ok", "oom": "oom", "error": "error"}.get(status, "unknown")
    headline = d.get("headline") or "Diagnosis"
    return (f'<section id="diagnosis" class="diagnosis diagnosis-{kind}"><h2 class="headline">{_e(headline)}</h2>'
            f'<p class="explanation">{_e(d.get("explanation") or "")}</p>'
            f'<div class="figures">{"".join(cards)}</div>{extra}</section>')


def _prediction_table(report: dict) -> str:
    pred = _dict(report.get("prediction"))
    attr = _dict(report.get("attribution"))
    outcome = _dict(report.get("outcome"))
    if not pred and not attr and not outcome:
        return '<p class="muted">no prediction was made</p>'

    def measured_overhead() -> float | None:
        vals = [_num(attr.get(k)) for k in ("other", "fragmentation")]
        vals = [v for v in vals if v is not None]
        return sum(vals) if vals else None

    rows = [
        ("weights", _num(pred.get("weights_bytes")), _num(attr.get("weights"))),
        ("KV cache", _num(pred.get("kv_bytes")), _num(attr.get("kv_cache"))),
        ("activations", _num(pred.get("activation_bytes")), _num(attr.get("activations"))),
        ("overhead (other + fragmentation)", _num(pred.get("overhead_bytes")), measured_overhead()),
        ("peak allocated", _num(pred.get("peak_bytes")), _num(outcome.get("peak_allocated_bytes"))),
        ("peak reserved", _num(pred.get("peak_bytes")), _num(outcome.get("peak_reserved_bytes"))),
        ("capacity", _num(pred.get("capacity_bytes")), _num(_dict(report.get("device")).get("capacity_bytes"))),
    ]
    body = []
    for label, p, m in rows:
        if p is None and m is None:
            continue
        diff = ""
        if p is not None and m is not None and label != "capacity":
            delta = m - p
            rel = f" ({delta / p:+.0%})" if p else ""
            diff = format_bytes(delta) + rel
            if delta > 0:
                diff = "+" + diff
        body.append(f'<tr><td>{_e(label)}</td><td class="num">{_e(_bytes(p))}</td>'
                    f'<td class="num">{_e(_bytes(m))}</td><td class="num">{_e(diff or "—")}</td></tr>')
    status = str(outcome.get("status") or "").lower()
    measured_fit = {"ok": True, "oom": False}.get(status)
    body.append(f'<tr class="total"><td>fits</td><td class="num">{_yes_no(pred.get("fits"))}</td>'
                f'<td class="num">{_yes_no(measured_fit)}</td><td class="num">'
                + ("—" if measured_fit is None or pred.get("fits") is None
                   else ("agrees" if bool(pred.get("fits")) == measured_fit else "<b>disagrees</b>"))
                + "</td></tr>")
    note = ""
    if status == "oom":
        note = ('<p class="caption">The run stopped at the out-of-memory error, so measured values are what was '
                'held when it failed, not what the whole run would have needed.</p>')
    return ('<table><thead><tr><th></th><th>predicted</th><th>measured</th><th>measured − predicted</th></tr>'
            f'</thead><tbody>{"".join(body)}</tbody></table>{note}')


def _fixes_table(report: dict) -> str:
    fixes = [f for f in _list(report.get("fixes")) if isinstance(f, dict)]
    if not fixes:
        return '<p class="muted">no fixes were proposed</p>'
    rows = "".join(
        f'<tr><td class="num">{_e(_int(f.get("rank")))}</td><td><code>{_e(f.get("option") or "—")}</code></td>'
        f'<td>{_e(f.get("change") or "")}</td><td class="num">{_e(_bytes(f.get("peak_bytes")))}</td>'
        f'<td>{_yes_no(f.get("fits"))}</td><td class="message">{_e(f.get("message") or "")}</td></tr>'
        for f in fixes
    )
    return ('<table class="fixes"><thead><tr><th>rank</th><th>option</th><th>change</th><th>predicted peak</th>'
            f'<th>fits</th><th>message</th></tr></thead><tbody>{rows}</tbody></table>')


def _fix_outcome(report: dict) -> str:
    fo = report.get("fix_outcome")
    if not isinstance(fo, dict):
        return ""
    rows = [
        ("applied", f'<code>{_e(fo.get("applied") or "—")}</code>'),
        ("status", _badge(fo.get("status"))),
        ("peak allocated", _e(_bytes(fo.get("peak_allocated_bytes")))),
        ("run time", _e(_seconds(fo.get("seconds")))),
    ]
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in rows)
    return f'<section id="fix-outcome"><h2>Fix outcome</h2><dl class="meta">{dl}</dl></section>'


def _snapshot(report: dict) -> str:
    snap = report.get("snapshot")
    if not snap:
        return ""
    href = quote(str(snap))
    return (f'<section id="snapshot"><h2>Memory snapshot</h2><p>PyTorch memory snapshot: '
            f'<a href="{_e(href)}">{_e(snap)}</a> — open at <a href="{MEMORY_VIZ_URL}">{MEMORY_VIZ_URL}</a> '
            f'(drag the file onto the page; it stays in your browser).</p></section>')


def _notes(report: dict) -> str:
    notes = [n for n in _list(report.get("notes")) if n not in (None, "")]
    if not notes:
        return ""
    items = "".join(f"<li>{_e(n)}</li>" for n in notes)
    return f'<section id="notes"><h2>Notes</h2><ul class="notes">{items}</ul></section>'


def _footer(report: dict) -> str:
    bits = [f"kvscope {report.get('kvscope_version') or '?'}"]
    if report.get("created"):
        bits.append(f"created {report['created']}")
    cmd = f'<br><code class="command">{_e(report["command"])}</code>' if report.get("command") else ""
    return f'<footer>{_e(" · ".join(bits))}{cmd}</footer>'


_CSS = """
:root { --fg:#1d232b; --muted:#5d6875; --line:#d8dde3; --bg:#ffffff; --panel:#f6f8fa; --ok:#1f8a3b; --oom:#c8283b;
        --error:#b25d00; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Liberation Sans", "DejaVu Sans", sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 28px 40px; }
h1 { font-size: 24px; margin: 0; }
h2 { font-size: 19px; margin: 0 0 10px; }
section { margin: 26px 0; }
.title-row { display: flex; align-items: center; gap: 14px; flex-wrap: wrap; }
.badge { display: inline-block; padding: 3px 12px; border-radius: 999px; color: #fff; font-weight: 700;
         font-size: 14px; letter-spacing: .04em; }
.badge-ok { background: var(--ok); } .badge-oom { background: var(--oom); } .badge-error { background: var(--error); }
.badge-unknown { background: #6b7280; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 14px 0 0; }
dl.meta dt { color: var(--muted); } dl.meta dd { margin: 0; overflow-wrap: anywhere; }
pre.error { background: #fdf0f1; border: 1px solid #f3c6cc; padding: 10px 12px; border-radius: 6px;
            white-space: pre-wrap; overflow-wrap: anywhere; font-size: 13px; margin: 14px 0 0; }
.diagnosis { background: var(--panel); border: 1px solid var(--line); border-left: 5px solid var(--oom);
             border-radius: 8px; padding: 16px 20px; }
.diagnosis-ok { border-left-color: var(--ok); } .diagnosis-error { border-left-color: var(--error); }
.diagnosis-unknown { border-left-color: #6b7280; }
.diagnosis .headline { font-size: 21px; }
.explanation { white-space: pre-line; margin: 0 0 12px; }
.figures { display: flex; flex-wrap: wrap; gap: 12px; }
.figure { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; min-width: 150px; }
.figure-label { color: var(--muted); font-size: 13px; } .figure-value { font-size: 20px; font-weight: 650; }
.figure.short .figure-value { color: var(--oom); }
.fix-option, .hint { margin: 12px 0 0; }
code { font-family: ui-monospace, "DejaVu Sans Mono", "Liberation Mono", monospace; font-size: 13px;
       background: #eef1f4; padding: 1px 5px; border-radius: 4px; }
svg.plot { display: block; width: 100%; height: auto; background: #fff; border: 1px solid var(--line);
           border-radius: 6px; }
svg.plot text { font: 12px system-ui, "Liberation Sans", "DejaVu Sans", sans-serif; fill: #333; }
svg.plot .axis-label { font-size: 13px; font-weight: 600; fill: #222; }
svg.plot .grid { stroke: #e6e9ed; stroke-width: 1; }
svg.plot .axis-line, svg.plot .tick { stroke: #6b7280; stroke-width: 1; }
svg.plot .phase-label { font-weight: 600; }
svg.plot .halo { paint-order: stroke; stroke: #fff; stroke-width: 3px; stroke-linejoin: round; }
svg.plot .on-bar { fill: #fff; font-weight: 600; }
p.no-data { color: var(--muted); background: var(--panel); border: 1px dashed var(--line); border-radius: 6px;
            padding: 14px 16px; margin: 0; font-style: italic; }
.caption { color: var(--muted); font-size: 13px; margin: 6px 0 0; }
ul.phases-list { color: var(--muted); font-size: 13px; margin: 6px 0 0; padding-left: 20px; }
table { border-collapse: collapse; width: 100%; margin-top: 4px; font-size: 14px; }
table.compact { width: auto; min-width: 360px; margin-top: 10px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--panel); font-weight: 600; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 600; }
td.message { color: var(--muted); font-size: 13px; }
.yes { color: var(--ok); font-weight: 600; } .no { color: var(--oom); font-weight: 600; }
.muted { color: var(--muted); }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 7px;
          vertical-align: -1px; }
footer { color: var(--muted); font-size: 13px; border-top: 1px solid var(--line); padding-top: 12px;
         margin-top: 32px; overflow-wrap: anywhere; }
@media print { main { max-width: none; } section { break-inside: avoid; } }
"""


def render_html(report: dict) -> str:
    """The whole report as one self-contained HTML document."""
    report = _dict(report)
    model = _dict(report.get("model")).get("name") or "unknown model"
    status = str(_dict(report.get("outcome")).get("status") or "unknown").upper()
    body = [
        _header(report),
        _diagnosis(report),
        f'<section id="timeline"><h2>Memory timeline</h2>{_timeline_plot(report)}</section>',
        f'<section id="attribution"><h2>Attribution at the peak</h2>{_attribution_plot(report)}</section>',
        f'<section id="kv-layers"><h2>KV cache per layer</h2>{_kv_layers_plot(report)}</section>',
        f'<section id="evictions"><h2>Evictions over time</h2>{_evictions_plot(report)}</section>',
        f'<section id="prediction"><h2>Prediction vs measured</h2>{_prediction_table(report)}</section>',
        f'<section id="fixes"><h2>Fixes</h2>{_fixes_table(report)}</section>',
        _fix_outcome(report),
        _snapshot(report),
        _notes(report),
        _footer(report),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # the page loads nothing: no scripts, no fetches, no external styles, fonts or images
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'">'
        f"<title>{_e(f'kvscope doctor: {model} ({status})')}</title>"
        f"<style>{_CSS}</style></head>\n<body><main>\n" + "\n".join(b for b in body if b) + "\n</main></body></html>\n"
    )
