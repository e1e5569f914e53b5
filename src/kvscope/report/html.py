"""Render a doctor report as one self-contained HTML page: a jinja2 template (templates/report.html.j2) over the
typed report (kvscope.report.model), with the charts inline as static SVG (kvscope.report.figures).

The page needs nothing but itself: no scripts, no external CSS or fonts, no network. Every piece of text from the
report is escaped by the template. A chart with nothing to draw shows a short "no data: <reason>" paragraph under the
chart's id instead.

>>> page = render_html({"diagnosis": {"headline": "<b>too big</b>"}})
>>> "&lt;b&gt;too big&lt;/b&gt;" in page and "<b>too big" not in page
True
"""

from __future__ import annotations

import html
from functools import lru_cache
from typing import Any

from kvscope.planner.sizes import format_bytes
from kvscope.report import figures
from kvscope.report.model import DoctorReport, number

PLOT_IDS = figures.PLOT_IDS
MEMORY_VIZ_URL = "https://pytorch.org/memory_viz"


@lru_cache(maxsize=1)
def _template():
    import jinja2
    from markupsafe import Markup

    def escaped(value: Any) -> Markup:  # every value as html.escape writes it (None as nothing); SVG and macros pass
        return value if isinstance(value, Markup) else Markup(html.escape("" if value is None else str(value)))

    env = jinja2.Environment(loader=jinja2.PackageLoader("kvscope.report", "templates"), autoescape=True,
                             finalize=escaped, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2")


def render_html(report: DoctorReport | dict) -> str:
    """The whole report as one self-contained HTML document."""
    r = report if isinstance(report, DoctorReport) else DoctorReport.from_dict(report)
    charts = {"timeline": figures.timeline(r), "attribution": figures.attribution(r),
              "kv_layers": figures.kv_layers(r), "evictions": figures.evictions(r)}
    attr = charts["attribution"]
    total = attr.total_bytes
    capacity = r.device.capacity_bytes
    context = {
        "name": r.model.name or "unknown model", "status": r.outcome.status or "unknown", "head": _header(r),
        "diagnosis": _diagnosis(r), "charts": charts, "timeline_caption": _timeline_caption(r),
        "phases": _phases(r), "kv_caption": _kv_caption(r) if charts["kv_layers"].svg else "", "evictions_caption": "",
        "attribution_total": format_bytes(total) if total else "",
        "attribution_capacity": (format_bytes(capacity), f"{total / capacity:.1%}") if total and capacity else None,
        "prediction": _prediction(r), "fixes": _fixes(r), "fix": _fix_outcome(r), "snapshot": r.snapshot,
        "memory_viz": MEMORY_VIZ_URL, "notes": [n for n in r.notes if n], "footer": _footer(r), "command": r.command,
    }
    return _template().render(**context) + "\n"


# --- what the template shows, as text --------------------------------------------------------------------------------
def _bytes(value: Any) -> str:
    n = number(value)
    return "—" if n is None else format_bytes(n)


def _int(value: Any) -> str:
    n = number(value)
    return "—" if n is None else f"{round(n):,}"


def _seconds(value: Any) -> str:
    n = number(value)
    return "—" if n is None else (f"{n:.2f} s" if n < 100 else f"{n:.0f} s")


def _badge(status: Any, detail: Any = None) -> dict:
    text = str(status or "unknown").strip().lower()
    kind = {"ok": "ok", "oom": "oom", "error": "error"}.get(text, "unknown")
    if detail == "kv_budget_exceeded":  # the workload outgrew its budget: a does-not-fit, not a failure of kvscope
        kind, text = "oom", "kv budget exceeded"
    return {"kind": kind, "text": text}


def _header(r: DoctorReport) -> dict:
    w, dev = r.workload, r.device
    bits = []
    if w.get("batch") is not None or w.get("context") is not None:
        bits.append(f"batch {_int(w.get('batch'))} × context {_int(w.get('context'))}"
                    + (f" + {_int(w.get('new_tokens'))} new tokens" if w.get("new_tokens") is not None else ""))
    bits += [f"{label} {w[key]}" for key, label in (("runtime", "runtime"), ("kv_dtype", "KV dtype"),
                                                   ("policy", "policy")) if w.get(key)]
    if w.get("budget_tokens") is not None:
        bits.append(f"budget {_int(w.get('budget_tokens'))} tokens")
    device = [dev.name or "unknown device"] + (["no CUDA"] if dev.cuda is False else [])
    if dev.capacity_bytes is not None:
        device.append(f"capacity {_bytes(dev.capacity_bytes)}" + (" (emulated)" if dev.emulated else ""))
    if dev.total_bytes is not None and dev.total_bytes != dev.capacity_bytes:
        device.append(f"total {_bytes(dev.total_bytes)}")
    layers = f" · {_int(r.model.num_layers)} layers" if r.model.num_layers is not None else ""
    rows = [("model", f"{r.model.name or 'unknown model'}{layers}"), ("workload", " · ".join(bits) or "—"),
            ("device", " · ".join(device)), ("run time", _seconds(r.outcome.seconds))]
    return {"rows": rows, "error": r.outcome.error, "badge": _badge(r.outcome.status, r.outcome.detail)}


def _diagnosis(r: DoctorReport) -> dict | None:
    d = r.diagnosis
    if d is None:
        return None
    cards = []
    for f in d.figures:  # each card says what its number is: needed, available, held at the failure, the fix's
        if f.tokens is not None:
            value, sub = f"{f.tokens:,.0f} tokens", (format_bytes(f.bytes) if f.bytes is not None else "")
        else:
            value, sub = (format_bytes(f.bytes) if f.bytes is not None else "—"), ""
        cards.append({"label": f.label or "", "value": value, "sub": sub, "detail": f.detail,
                      "short": f.label == "short by"})
    kind = {"ok": "ok", "oom": "oom", "error": "error"}.get(str(r.outcome.status or "").lower(), "unknown")
    return {"kind": kind, "headline": d.headline or "Diagnosis", "explanation": d.explanation or "", "cards": cards,
            "option": d.option, "expandable": d.recommend_expandable_segments}


def _timeline_caption(r: DoctorReport) -> str:
    capacity = r.device.capacity_bytes or number(r.prediction.get("capacity_bytes"))
    if r.device.cuda is False and capacity and r.timeline.t:
        return (f"Scaled to what was measured: the capacity ({format_bytes(capacity)} of host memory, or "
                "--gpu-memory) is far above it and is not drawn.")
    return ""


def _phases(r: DoctorReport) -> list[dict]:
    return [{"name": p.name or "phase", "detail": p.detail,
             "span": "—" if p.start is None or p.end is None else f"{p.start:.2f}–{p.end:.2f} s"} for p in r.phases]


def _kv_caption(r: DoctorReport) -> str:
    from kvscope.report.series import kv_rows

    data, w = kv_rows(r)
    budget = number(w.get("budget_tokens"))
    total = sum(b for *_, b, _ in data if b is not None)
    stored, evicted = max(s for _, s, *_ in data), max(e for _, _, e, *_ in data)
    batch = number(w.get("batch")) or 1
    return (f"Tokens are per sequence and layer (batch of {batch:,.0f}): at most {stored:,.0f} stored and "
            f"{evicted:,.0f} evicted in a layer" + (f"; budget {budget:,.0f}" if budget else "")
            + (f". Bytes are the whole batch's: {format_bytes(total)} allocated in {len(data)} layers" if total else "")
            + ". Hover a bar for its figures.")


def _prediction(r: DoctorReport) -> dict | None:
    pred, attr, o = r.prediction, r.attribution, r.outcome
    if not pred and not attr and o == type(o)():
        return None
    n = lambda d, k: number(d.get(k))  # noqa: E731
    overhead = [v for v in (n(attr, "other"), n(attr, "fragmentation")) if v is not None]
    rows = [("weights", n(pred, "weights_bytes"), n(attr, "weights")),
            ("KV cache", n(pred, "kv_bytes"), n(attr, "kv_cache")),
            ("activations", n(pred, "activation_bytes"), n(attr, "activations")),
            ("overhead (other + fragmentation)", n(pred, "overhead_bytes"), sum(overhead) if overhead else None),
            ("peak allocated", n(pred, "peak_bytes"), o.peak_allocated_bytes),
            ("peak reserved", n(pred, "peak_bytes"), o.peak_reserved_bytes),
            ("capacity", n(pred, "capacity_bytes"), r.device.capacity_bytes)]
    status = str(o.status or "").lower()
    measured_fit = {"ok": True, "oom": False}.get(status)
    fits = pred.get("fits") if isinstance(pred.get("fits"), bool) else None
    stopped = None
    if status in ("oom", "error"):
        stopped = "KV budget overflow" if o.detail == "kv_budget_exceeded" else (
            "out-of-memory error" if status == "oom" else "failure")
    return {"rows": [(label, _bytes(p), _bytes(m), _diff(label, p, m)) for label, p, m in rows
                     if p is not None or m is not None],
            "fits": fits, "measured_fit": measured_fit, "stopped": stopped,
            "agrees": None if measured_fit is None or fits is None else fits == measured_fit}


def _diff(label: str, p: float | None, m: float | None) -> str:
    if p is None or m is None or label == "capacity":
        return "—"
    delta = m - p
    text = format_bytes(delta) + (f" ({delta / p:+.0%})" if p else "")
    return "+" + text if delta > 0 else text


def _fixes(r: DoctorReport) -> list[dict]:
    return [{"rank": _int(f.get("rank")), "option": f.get("option") or "—", "command": f.get("command"),
             "change": f.get("change") or f.get("action") or "",
             "estimate": _bytes(f.get("peak_bytes", f.get("estimate_bytes"))), "estimate_of": f.get("estimate_of"),
             "fits": f.get("fits") if isinstance(f.get("fits"), bool) else None, "message": f.get("message") or ""}
            for f in r.fixes if isinstance(f, dict)]


def _fix_outcome(r: DoctorReport) -> dict | None:
    fo = r.fix_outcome
    if fo is None:
        return None
    c = fo.check
    what = (c.what if c else None) or "peak"
    rows = [(f"estimated {what}", _bytes(c.estimate_bytes if c else None)),
            (f"measured {what}", _bytes(c.measured_bytes if c else None)),
            ("peak allocated", _bytes(fo.peak_allocated_bytes)),
            ("evicted tokens (all layers, whole batch)", _int(fo.evicted_tokens)), ("run time", _seconds(fo.seconds))]
    return {"applied": fo.applied or "—", "badge": _badge(fo.status), "rows": rows,
            "agrees": None if c is None else bool(c.agrees), "problems": c.problems if c else []}


def _footer(r: DoctorReport) -> str:
    return " · ".join([f"kvscope {r.kvscope_version or '?'}"] + ([f"created {r.created}"] if r.created else []))
