"""The report's four charts, drawn with matplotlib (kvscope.report.charts): memory over time, where the memory went,
KV cache per layer, evictions over time. Each returns a `Chart`: the SVG, or the reason there is nothing to draw,
and the figures it says in words (its caption and hover texts), which the page shows and the tests read."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvscope.planner.sizes import format_bytes
from kvscope.report import charts
from kvscope.report.model import DoctorReport, number
from kvscope.report.series import budget_lines, decimate, failures, kv_rows, points, timeline_series

PLOT_IDS = ("plot-timeline", "plot-kv-layers", "plot-evictions", "plot-attribution")
ATTRIBUTION = (("weights", "weights"), ("kv_cache", "KV cache"), ("activations", "activations"), ("other", "other"),
               ("fragmentation", "fragmentation"))
WIDTH = 10.0  # inches; the page scales every chart to its width


@dataclass
class Chart:
    plot_id: str
    svg: str | None = None
    no_data: str | None = None  # why nothing was drawn
    ylim: tuple[float, float] | None = None  # data units: what the y axis spans
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)  # (colour, label, bytes, share) of a table
    total_bytes: float | None = None


def _no_data(pid: str, reason: str) -> Chart:
    return Chart(pid, no_data=reason)


def _hline(ax, y: float, text: str, color: str, gid: str, start: float | None = None, right: bool = False) -> None:
    lo, hi = ax.get_xlim()
    xa = lo if start is None else start
    ax.plot([xa, hi], [y, y], color=color, lw=1.5, ls=(0, (6, 4)), gid=gid)
    ax.annotate(text, (hi if right else xa, y), xytext=(-6 if right else 6, -12 if right else 4),
                textcoords="offset points", ha="right" if right else "left", color=color, fontsize=9)


def timeline(r: DoctorReport) -> Chart:
    pid = "plot-timeline"
    if not r.timeline.t:
        return _no_data(pid, "no memory samples were recorded")
    series = timeline_series(r)
    if not series:
        return _no_data(pid, "the timeline has times but no memory samples (allocated, reserved, NVML or RSS)")
    capacity = r.device.capacity_bytes or number(r.prediction.get("capacity_bytes"))
    on_cpu = r.device.cuda is False  # capacity is host memory (or --gpu-memory): far off what was measured
    budgets = budget_lines(r)
    xs = [p[0] for _, _, pts in series for p in pts if p is not None]
    ys = [p[1] for _, _, pts in series for p in pts if p is not None]
    t_lo = min(0.0, min(xs))
    t_hi = max([max(xs)] + [p.end for p in r.phases if p.end is not None])
    t_hi = t_hi if t_hi > t_lo else t_lo + 1.0
    y_hi = max([max(ys)] + [b for _, b, _ in budgets] + ([] if on_cpu else [capacity or 0.0])) * 1.04
    unit, size = charts.byte_unit(y_hi)
    fig, ax = charts.figure(WIDTH, 3.9)
    ax.set_xlim(t_lo, t_hi)
    ax.set_ylim(0, y_hi / size)
    titles = _phase_bands(ax, r, t_lo, t_hi, y_hi / size)
    draw_order = ("nvml_used", "rss", "reserved", "kv_cache", "allocated")  # allocated last, on top of its neighbours
    for key, label, pts in sorted(series, key=lambda s: draw_order.index(s[0])):
        peak = max(p[1] for p in pts if p is not None)
        xs_, ys_ = zip(*[(p[0], p[1] / size) if p is not None else (float("nan"),) * 2 for p in pts])
        ax.plot(xs_, ys_, color=charts.COLORS[key], lw=2, label=label, gid=f"series-{key}")
        titles[f"series-{key}"] = f"{label}: peak {format_bytes(peak)}"
    if capacity and not on_cpu:
        _hline(ax, capacity / size, f"capacity {format_bytes(capacity)}", charts.COLORS["capacity"], "capacity",
               right=True)
        ax.plot([], [], color=charts.COLORS["capacity"], ls="--", label="capacity")
    for i, (label, budget, start) in enumerate(budgets):  # the fix's line is labelled at its right end
        _hline(ax, budget / size, label, charts.COLORS["kv_budget"], f"kv-budget-{i}", start, right=start is not None)
    if budgets:
        ax.plot([], [], color=charts.COLORS["kv_budget"], ls="--", label="KV budget")
    for i, (label, at) in enumerate(failures(r, xs)):
        ax.axvline(at, color=charts.COLORS["capacity"], lw=1.5, gid=f"failure-{i}")
        ax.annotate(f"{label} at {at:.2f} s", (at, y_hi / size), xytext=(4, -14), textcoords="offset points",
                    color=charts.COLORS["capacity"], fontweight="bold", fontsize=9)
        titles[f"failure-{i}"] = f"{label} at {at:.2f} s"
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"memory ({unit})")
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncols=7, fontsize=9, frameon=False)
    return Chart(pid, charts.svg(fig, pid, "Memory over time", titles=titles), ylim=(0, y_hi))


def _phase_bands(ax, r: DoctorReport, lo: float, hi: float, top: float) -> dict[str, str]:
    """Shaded phase bands under the lines, labelled where they are wide enough; their hover texts."""
    titles = {}
    for i, ph in enumerate(r.phases):
        if ph.start is None or ph.end is None or ph.end < ph.start:
            continue
        fill = charts.PHASE_FILLS[i % len(charts.PHASE_FILLS)]
        name = ph.name or f"phase {i + 1}"
        ax.axvspan(max(ph.start, lo), min(ph.end, hi), color=fill, alpha=0.10, lw=0, gid=f"phase-{i}")
        titles[f"phase-{i}"] = f"{name}: {ph.start:.2f}–{ph.end:.2f} s" + (f" — {ph.detail}" if ph.detail else "")
        if (min(ph.end, hi) - max(ph.start, lo)) / (hi - lo) > 0.012 * len(name):
            ax.text(max(ph.start, lo), top, f" {name}", color=fill, fontweight="bold", fontsize=9, va="top")
    return titles


def kv_layers(r: DoctorReport) -> Chart:
    pid = "plot-kv-layers"
    data, w = kv_rows(r)
    if not data:
        return _no_data(pid, "no per-layer KV cache statistics were recorded")
    budget = number(w.get("budget_tokens"))
    slots = any(c and c != s for _, s, _, _, c in data)  # kvscope's preallocated slots (HF's cache has none)
    tallest = max([s + e for _, s, e, _, _ in data] + [(c or 0.0) for *_, c in data if slots] + [budget or 0.0])
    if tallest <= 0:
        return _no_data(pid, "the KV cache held no tokens and evicted none")
    fig, ax = charts.figure(WIDTH, 3.5)
    x = list(range(len(data)))
    stored = [s for _, s, *_ in data]
    evicted = [e for _, _, e, *_ in data]
    ax.bar(x, stored, 0.72, color=charts.COLORS["stored"], label="stored per sequence")
    ax.bar(x, evicted, 0.72, bottom=stored, color=charts.COLORS["evicted"], alpha=0.85, label="evicted per sequence")
    titles = {}
    for i, (layer, s, e, nbytes, cap) in enumerate(data):  # an invisible bar per layer carries its hover text
        ax.bar([i], [max(s + e, cap or 0.0)], 0.9, color="none", gid=f"layer-{i}")
        titles[f"layer-{i}"] = (f"layer {layer}: {s:,.0f} tokens stored per sequence, {e:,.0f} evicted per sequence"
                                + (f"; {format_bytes(nbytes)} allocated for the whole batch" if nbytes else "")
                                + (f"; {cap:,.0f} slots allocated per sequence" if cap and slots else ""))
    if slots:
        ax.scatter(x, [c or 0.0 for *_, c in data], marker="_", s=120, color="#222", lw=2,
                   label="allocated slots (budget + one chunk)")
    ax.set_xlim(-0.6, len(data) - 0.4)
    ax.set_ylim(0, tallest * 1.04)
    if budget:
        _hline(ax, budget, f"budget {budget:,.0f} tokens", charts.COLORS["kv_budget"], "kv-budget")
        ax.plot([], [], color=charts.COLORS["kv_budget"], ls="--", label="budget")
    ax.set_xticks(x[:: max(1, -(-len(data) // 32))], [str(d[0]) for d in data][:: max(1, -(-len(data) // 32))])
    ax.yaxis.set_major_formatter(charts.tokens_text)
    ax.set_xlabel("layer")
    ax.set_ylabel("tokens per sequence")
    ax.grid(axis="x", visible=False)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncols=4, fontsize=9, frameon=False)
    return Chart(pid, charts.svg(fig, pid, "KV cache tokens per layer, per sequence", titles=titles),
                 ylim=(0, tallest * 1.04))


def evictions(r: DoctorReport) -> Chart:
    pid = "plot-evictions"
    pts = points(r.evictions.t, r.evictions.evicted_tokens)
    real = [p for p in pts if p is not None]
    if not real or max(p[1] for p in real) <= 0:
        policy = r.workload.get("policy")
        why = f"policy {policy}" if policy else "no eviction policy (the full cache is kept)"
        return _no_data(pid, f"no tokens were evicted ({why})")
    real = [p for p in decimate(pts) if p is not None]
    t_lo = min(0.0, real[0][0])
    t_hi = max([p[0] for p in real] + [p.end for p in r.phases if p.end is not None])
    t_hi = t_hi if t_hi > t_lo else t_lo + 1.0
    fig, ax = charts.figure(WIDTH, 3.1)
    xs, ys = [p[0] for p in real], [p[1] for p in real]
    color = charts.COLORS["evicted"]
    ax.fill_between(xs, ys, step="post", color=color, alpha=0.15, lw=0)  # cumulative counts change in steps
    ax.step(xs, ys, where="post", color=color, lw=2, label="evicted tokens (cumulative)", gid="evicted")
    last = real[-1]
    ax.plot([last[0]], [last[1]], "o", color=color, ms=5)
    ax.annotate(f"{last[1]:,.0f}", last, xytext=(-4, 6), textcoords="offset points", ha="right")
    ax.set_xlim(t_lo, t_hi)
    ax.set_ylim(0, max(ys) * 1.04)
    ax.yaxis.set_major_formatter(charts.tokens_text)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("evicted tokens (cumulative)")
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), fontsize=9, frameon=False)
    tip = {"evicted": f"{last[1]:,.0f} tokens evicted by {last[0]:.2f} s"}
    return Chart(pid, charts.svg(fig, pid, "Evicted tokens over time (cumulative)", titles=tip),
                 ylim=(0, max(ys) * 1.04))


def attribution(r: DoctorReport) -> Chart:
    pid = "plot-attribution"
    items = [(key, label, max(number(r.attribution.get(key)) or 0.0, 0.0)) for key, label in ATTRIBUTION]
    total = sum(v for *_, v in items)
    if total <= 0:
        return _no_data(pid, "no memory attribution was computed")
    capacity = r.device.capacity_bytes
    drawn_capacity = None if r.device.cuda is False else capacity  # host memory would dwarf what was measured
    hi = max(total, drawn_capacity or 0.0) * 1.02
    unit, size = charts.byte_unit(hi)
    fig, ax = charts.figure(WIDTH, 1.7)
    left, titles = 0.0, {}
    for key, label, value in items:
        if value <= 0:
            continue
        ax.barh([0], [value / size], left=[left / size], color=charts.COLORS[key], label=label, gid=f"part-{key}")
        titles[f"part-{key}"] = f"{label}: {format_bytes(value)} ({value / total:.1%})"
        if value / hi > 0.09:
            ax.text((left + value / 2) / size, 0, format_bytes(value), ha="center", va="center", color="white",
                    fontweight="bold", fontsize=9)
        left += value
    if drawn_capacity:
        ax.axvline(drawn_capacity / size, color=charts.COLORS["capacity"], lw=2, ls=(0, (6, 4)), label="capacity",
                   gid="capacity")
        titles["capacity"] = f"capacity {format_bytes(capacity)}"
    ax.set_xlim(0, hi / size)
    ax.set_yticks([0], ["peak"])
    ax.set_xlabel(f"memory ({unit})")
    ax.grid(axis="y", visible=False)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncols=6, fontsize=9, frameon=False)
    rows = [(charts.COLORS[key], label, format_bytes(value), f"{value / total:.1%}") for key, label, value in items]
    return Chart(pid, charts.svg(fig, pid, "Where the memory went", titles=titles), rows=rows, total_bytes=total)
