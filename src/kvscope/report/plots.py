"""The report's four plots: memory over time, KV cache per layer, evictions over time, attribution at the peak."""

from __future__ import annotations

import math

from kvscope.planner.sizes import format_bytes
from kvscope.report.svg import (
    _ATTRIBUTION,
    _BOTTOM,
    _COLORS,
    _LEFT,
    _PHASE_FILLS,
    _RIGHT,
    _TOP,
    _W,
    _byte_unit,
    _decimate,
    _dict,
    _e,
    _fmt_tick,
    _fmt_tokens,
    _legend,
    _list,
    _nice_ticks,
    _no_data,
    _num,
    _pairs,
    _polylines,
    _Scale,
    _svg_open,
    _x_axis,
    _y_axis,
)

# plots


def _timeline_series(report: dict) -> list[tuple[str, str, list]]:
    tl = _dict(report.get("timeline"))
    t = _list(tl.get("t"))
    series = []
    for key, label in (("allocated", "allocated"), ("reserved", "reserved"), ("nvml_used", "NVML used"),
                       ("rss", "process RSS (host)")):
        pts = _pairs(t, _list(tl.get(key)))
        if any(p is not None for p in pts):
            series.append((key, label, _decimate(pts)))
    kv = _dict(report.get("kv_timeline"))
    pts = _pairs(_list(kv.get("t")), _list(kv.get("bytes")))
    if any(p is not None and p[1] > 0 for p in pts):
        series.append(("kv_cache", "KV cache (allocated)", _decimate(pts)))
    return series


def _budget_lines(report: dict) -> list[tuple[str, float, float | None]]:
    """(label, bytes, start time) of the KV budgets that ran: the workload's, and the fix's from when it started."""
    lines = []
    budget = _num(_dict(report.get("workload")).get("kv_budget_bytes"))
    if budget:
        lines.append((f"KV budget {format_bytes(budget)} (budget + one chunk)", budget, None))
    fo = _dict(report.get("fix_outcome"))
    fixed = _num(_dict(fo.get("workload")).get("kv_budget_bytes"))
    if fixed and fixed != budget:
        start = next((_num(p.get("start")) for p in _list(report.get("phases")) if _dict(p).get("name") == "fix"), None)
        lines.append((f"fix's KV budget {format_bytes(fixed)}", fixed, start))
    return lines


def _failures(report: dict, xs: list[float]) -> list[tuple[str, float]]:
    """(label, time) of each failed run: the workload's (at its own failure, not at the end of the timeline) and the
    fix's, if it failed too."""
    out = []
    for key, prefix in (("outcome", ""), ("fix_outcome", "fix: ")):
        o = _dict(report.get(key))
        status = str(o.get("status") or "").lower()
        if status not in ("oom", "error"):
            continue
        at = _num(o.get("failed_at"))
        if at is None and key == "outcome":  # older reports: the end of the first run, before any fix started
            fix = [_num(p.get("start")) for p in _list(report.get("phases")) if _dict(p).get("name") == "fix"]
            at = fix[0] if fix and fix[0] is not None else max(xs)
        if at is not None:
            detail = str(o.get("detail") or status)
            label = "OOM" if status == "oom" else ("KV budget exceeded" if detail == "kv_budget_exceeded" else "error")
            out.append((prefix + label, at))
    return out


def _timeline_plot(report: dict) -> str:
    pid = "plot-timeline"
    if not _list(_dict(report.get("timeline")).get("t")):
        return _no_data(pid, "no memory samples were recorded")
    series = _timeline_series(report)
    if not series:
        return _no_data(pid, "the timeline has times but no memory samples (allocated, reserved, NVML or RSS)")

    device = _dict(report.get("device"))
    capacity = _num(device.get("capacity_bytes")) or _num(_dict(report.get("prediction")).get("capacity_bytes"))
    on_cpu = device.get("cuda") is False  # capacity is host memory (or --gpu-memory): far off what was measured
    phases = [p for p in _list(report.get("phases")) if isinstance(p, dict)]
    budgets = _budget_lines(report)

    xs = [p[0] for _, _, pts in series for p in pts if p is not None]
    ys = [p[1] for _, _, pts in series for p in pts if p is not None]
    t_lo = min(0.0, min(xs))
    t_hi = max([max(xs)] + [e for e in (_num(ph.get("end")) for ph in phases) if e is not None])
    if t_hi <= t_lo:
        t_hi = t_lo + 1.0
    scale_to = [max(ys)] + [b for _, b, _ in budgets] + ([] if on_cpu else [capacity or 0.0])
    y_hi = max(scale_to) * 1.04
    unit, size = _byte_unit(y_hi)
    yticks, ytop = _nice_ticks(y_hi / size, 6)
    xticks, xtop = _nice_ticks(t_hi - t_lo, 8)
    xticks = [t_lo + v for v in xticks]

    height = 380
    x0, x1, top, bottom = _LEFT, _W - _RIGHT, _TOP, height - _BOTTOM
    sx = _Scale(t_lo, t_lo + xtop, x0, x1)
    sy = _Scale(0.0, ytop * size, bottom, top)

    parts = [_svg_open(pid, "Memory over time", height)]
    parts += _phase_bands(phases, sx, t_lo, t_lo + xtop, top, bottom)
    parts += _y_axis(sy, [v * size for v in yticks], lambda v: _fmt_tick(v / size), f"memory ({unit})",
                     x0, x1, top, bottom)
    parts += _x_axis(sx, xticks, _fmt_tick, "time (s)", bottom, x0, x1, height)

    legend = [(label, _COLORS[key], "line") for key, label, _ in series]
    draw_order = ("nvml_used", "rss", "reserved", "kv_cache", "allocated")  # allocated last, on top of its neighbours
    for key, label, pts in sorted(series, key=lambda s: draw_order.index(s[0])):
        color = _COLORS[key]
        peak = max(p[1] for p in pts if p is not None)
        parts.append(f'<g class="series series-{key}"><title>{_e(label)}: peak {_e(format_bytes(peak))}</title>')
        parts += _polylines(pts, sx, sy, f'fill="none" stroke="{color}" stroke-width="2" '
                                         f'stroke-linejoin="round"')
        parts.append("</g>")
    if capacity and not on_cpu:
        parts += _hline("capacity", f"capacity {format_bytes(capacity)}", sy(capacity), x0, x1, _COLORS["capacity"])
        legend.append(("capacity", _COLORS["capacity"], "dash"))
    for label, budget, start in budgets:  # the fix's line is labelled at its right end, clear of the first
        xa = sx(start) if start is not None else x0
        parts += _hline("kv-budget", label, sy(budget), xa, x1, _COLORS["kv_budget"], right=start is not None)
    if budgets:
        legend.append(("KV budget", _COLORS["kv_budget"], "dash"))
    for label, at in _failures(report, xs):
        x = sx(at)
        parts.append(f'<g class="failure"><title>{_e(f"{label} at {at:.2f} s")}</title><line x1="{x:.1f}" '
                     f'y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="{_COLORS["capacity"]}" stroke-width="1.5"/>'
                     f'<text class="halo" x="{x + 4:.1f}" y="{top + 30}" '
                     f'style="fill:{_COLORS["capacity"]};font-weight:700">{_e(label)}</text></g>')
    parts += _legend(legend)
    parts.append("</svg>")
    caption = ""
    if on_cpu and capacity:
        caption = (f'<p class="caption">Scaled to what was measured: the capacity ({_e(format_bytes(capacity))} of '
                   "host memory, or --gpu-memory) is far above it and is not drawn.</p>")
    return "".join(parts) + caption + _phase_list(phases)


def _hline(cls: str, text: str, y: float, xa: float, xb: float, color: str, right: bool = False) -> list[str]:
    where = f'x="{xb - 6:.1f}" y="{y + 13:.1f}" text-anchor="end"' if right else f'x="{xa + 6:.1f}" y="{y - 5:.1f}"'
    return [f'<g class="{cls}"><title>{_e(text)}</title>'
            f'<line x1="{xa:.1f}" y1="{y:.1f}" x2="{xb}" y2="{y:.1f}" stroke="{color}" '
            f'stroke-width="1.5" stroke-dasharray="6 4"/>'
            f'<text class="halo" {where} style="fill:{color}">{_e(text)}</text></g>']


def _phase_bands(phases: list[dict], sx: _Scale, lo: float, hi: float, top: float, bottom: float) -> list[str]:
    """Shaded phase bands, drawn first so the lines go over them."""
    parts = ['<g class="phases">']
    for i, ph in enumerate(phases):
        start, end = _num(ph.get("start")), _num(ph.get("end"))
        if start is None or end is None or end < start:
            continue
        xa, xb = sx(max(start, lo)), sx(min(end, hi))
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
    return parts


def _phase_list(phases: list[dict]) -> str:
    rows = []
    for ph in phases:
        start, end = _num(ph.get("start")), _num(ph.get("end"))
        span = "—" if start is None or end is None else f"{start:.2f}–{end:.2f} s"
        rows.append(f"<li><b>{_e(ph.get('name') or 'phase')}</b> {_e(span)}"
                    + (f" — {_e(ph.get('detail'))}" if ph.get("detail") else "") + "</li>")
    return f'<ul class="phases-list">{"".join(rows)}</ul>' if rows else ""


def _kv_rows(report: dict) -> tuple[list[tuple], dict]:
    """Per layer (layer, stored per sequence, evicted per sequence, bytes of the whole batch, allocated slots), and
    the workload the rows come from. The cache counts evictions over the batch; the chart divides them by it, so a
    bar is one sequence: stored + evicted = the tokens that sequence fed."""
    w = _dict(report.get("kv_layers_workload")) or _dict(report.get("workload"))
    batch = _num(w.get("batch")) or 1.0
    data = []
    for i, row in enumerate(r for r in _list(report.get("kv_layers")) if isinstance(r, dict)):
        layer = _num(row.get("layer"))
        data.append((int(layer) if layer is not None else i, _num(row.get("stored_tokens")) or 0.0,
                     (_num(row.get("evicted_tokens")) or 0.0) / batch, _num(row.get("bytes")),
                     _num(row.get("capacity_tokens"))))
    return data, w


def _kv_layers_plot(report: dict) -> str:
    pid = "plot-kv-layers"
    data, w = _kv_rows(report)
    if not data:
        return _no_data(pid, "no per-layer KV cache statistics were recorded")
    budget = _num(w.get("budget_tokens"))
    slots = any(c and c != s for _, s, _, _, c in data)  # kvscope's preallocated slots (HF's cache has none)
    tallest = max([s + e for _, s, e, _, _ in data] + [(c or 0.0) for *_, c in data if slots] + [budget or 0.0])
    if tallest <= 0:
        return _no_data(pid, "the KV cache held no tokens and evicted none")

    height = 340
    x0, x1, top, bottom = _LEFT, _W - _RIGHT, _TOP, height - _BOTTOM
    yticks, ytop = _nice_ticks(tallest * 1.04, 5)
    sy = _Scale(0.0, ytop, bottom, top)
    n = len(data)
    slot = (x1 - x0) / n
    bar = max(slot * 0.72, 1.0)

    parts = [_svg_open(pid, "KV cache tokens per layer, per sequence", height)]
    parts += _y_axis(sy, yticks, _fmt_tokens, "tokens per sequence", x0, x1, top, bottom)
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
    for i, row in enumerate(data):
        parts += _kv_bar(row, x0 + slot * i + (slot - bar) / 2, bar, sy, bottom, slots)
    parts.append("</g>")
    legend = [("stored per sequence", _COLORS["stored"], "box"), ("evicted per sequence", _COLORS["evicted"], "box")]
    if slots:
        legend.append(("allocated slots (budget + one chunk)", "#222", "line"))
    if budget:
        parts += _hline("kv-budget", f"budget {budget:,.0f} tokens", sy(budget), x0, x1, _COLORS["kv_budget"])
        legend.append(("budget", _COLORS["kv_budget"], "dash"))
    parts += _legend(legend)
    parts.append("</svg>")
    total_bytes = sum(b for *_, b, _ in data if b is not None)
    stored = max(s for _, s, *_ in data)
    evicted = max(e for _, _, e, *_ in data)
    batch = _fmt_tick(_num(w.get("batch")) or 1)
    summary = (f'<p class="caption">Tokens are per sequence and layer (batch of {_e(batch)}): at most '
               f'{_e(f"{stored:,.0f}")} stored and {_e(f"{evicted:,.0f}")} evicted in a layer'
               + (f"; budget {_e(f'{budget:,.0f}')}" if budget else "")
               + (f". Bytes are the whole batch's: {_e(format_bytes(total_bytes))} allocated in {n} layers"
                  if total_bytes else "") + ". Hover a bar for its figures.</p>")
    return "".join(parts) + summary


def _kv_bar(row: tuple, bx: float, bar: float, sy: _Scale, bottom: float, slots: bool) -> list[str]:
    layer, stored, evicted, nbytes, cap = row
    tip = (f"layer {layer}: {stored:,.0f} tokens stored per sequence, {evicted:,.0f} evicted per sequence"
           + (f"; {format_bytes(nbytes)} allocated for the whole batch" if nbytes is not None else "")
           + (f"; {cap:,.0f} slots allocated per sequence" if cap and slots else ""))
    y_stored, y_total = sy(stored), sy(stored + evicted)
    parts = [f'<g class="layer"><title>{_e(tip)}</title>']
    if stored > 0:
        parts.append(f'<rect class="stored" x="{bx:.1f}" y="{y_stored:.1f}" width="{bar:.1f}" '
                     f'height="{bottom - y_stored:.1f}" fill="{_COLORS["stored"]}"/>')
    if evicted > 0:
        parts.append(f'<rect class="evicted" x="{bx:.1f}" y="{y_total:.1f}" width="{bar:.1f}" '
                     f'height="{y_stored - y_total:.1f}" fill="{_COLORS["evicted"]}" fill-opacity="0.85"/>')
    if cap and slots:
        yc = sy(cap)
        parts.append(f'<line class="capacity" x1="{bx - 1:.1f}" y1="{yc:.1f}" x2="{bx + bar + 1:.1f}" '
                     f'y2="{yc:.1f}" stroke="#222" stroke-width="2"/>')
    parts.append("</g>")
    return parts


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
    device = _dict(report.get("device"))
    capacity = _num(device.get("capacity_bytes"))
    drawn_capacity = None if device.get("cuda") is False else capacity  # host memory would dwarf what was measured
    hi = max(total, drawn_capacity or 0.0) * 1.02
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
    if drawn_capacity:
        xc = sx(drawn_capacity)
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
