"""Render a doctor report dict as one self-contained HTML page.

The page needs nothing but itself: no scripts, no external CSS or fonts, no network. Plots are inline SVG drawn here
(no matplotlib). Every piece of text from the report is escaped. Every optional key may be missing or None; a plot
with nothing to draw shows a short "no data: <reason>" paragraph under the plot's id instead of an empty SVG.

>>> page = render_html({"diagnosis": {"headline": "<b>too big</b>"}})
>>> "&lt;b&gt;too big&lt;/b&gt;" in page and "<b>too big" not in page
True
"""

from __future__ import annotations

from urllib.parse import quote

from kvscope.planner.sizes import format_bytes
from kvscope.report.plots import _attribution_plot, _evictions_plot, _kv_layers_plot, _timeline_plot
from kvscope.report.svg import _badge, _bytes, _dict, _e, _int, _list, _num, _seconds, _yes_no

PLOT_IDS = ("plot-timeline", "plot-kv-layers", "plot-evictions", "plot-attribution")
MEMORY_VIZ_URL = "https://pytorch.org/memory_viz"


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
    badge = _badge(outcome.get("status"), outcome.get("detail"))
    return (f'<header><div class="title-row"><h1>kvscope doctor: {_e(name)}</h1>{badge}'
            f'</div><dl class="meta">{dl}</dl>{error}</header>')


def _card(f: dict) -> str:
    """One headline figure: its label, its value (bytes, or tokens with bytes beside) and what it is."""
    nbytes, tokens = _num(f.get("bytes")), _num(f.get("tokens"))
    if tokens is not None:
        value = f"{tokens:,.0f} tokens"
        sub = format_bytes(nbytes) if nbytes is not None else ""
    else:
        value, sub = (format_bytes(nbytes) if nbytes is not None else "—"), ""
    label = str(f.get("label") or "")
    cls = "figure short" if label == "short by" else "figure"
    return (f'<div class="{cls}"><div class="figure-label">{_e(label)}</div>'
            f'<div class="figure-value">{_e(value)}</div>'
            + (f'<div class="figure-sub">{_e(sub)}</div>' if sub else "")
            + (f'<div class="figure-detail">{_e(f.get("detail"))}</div>' if f.get("detail") else "") + "</div>")


def _diagnosis(report: dict) -> str:
    d = _dict(report.get("diagnosis"))
    if not d:
        return '<section id="diagnosis"><h2>Diagnosis</h2><p class="muted">no diagnosis was made</p></section>'
    # each card says what its number is: needed by the workload, available, held at the failure, needed by the fix
    cards = [_card(f) for f in _list(d.get("figures")) if isinstance(f, dict)]
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
    if status in ("oom", "error"):
        why = "out-of-memory error" if status == "oom" else "failure"
        if outcome.get("detail") == "kv_budget_exceeded":
            why = "KV budget overflow"
        note = (f'<p class="caption">The run stopped at the {why}, so measured values are what was held when it '
                'failed, not what the whole run would have needed.</p>')
    return ('<table><thead><tr><th></th><th>predicted</th><th>measured</th><th>measured − predicted</th></tr>'
            f'</thead><tbody>{"".join(body)}</tbody></table>{note}')


def _fixes_table(report: dict) -> str:
    fixes = [f for f in _list(report.get("fixes")) if isinstance(f, dict)]
    if not fixes:
        return '<p class="muted">no fixes were proposed</p>'
    rows = "".join(
        f'<tr><td class="num">{_e(_int(f.get("rank")))}</td><td><code>{_e(f.get("option") or "—")}</code>'
        + (f'<div class="command"><code>{_e(f["command"])}</code></div>' if f.get("command") else "")
        + f'</td><td>{_e(f.get("change") or "")}</td><td class="num">{_e(_bytes(f.get("peak_bytes")))}'
        + (f'<div class="muted">{_e(f["estimate_of"])}</div>' if f.get("estimate_of") else "")
        + f'</td><td>{_yes_no(f.get("fits"))}</td><td class="message">{_e(f.get("message") or "")}</td></tr>'
        for f in fixes
    )
    return ('<table class="fixes"><thead><tr><th>rank</th><th>option (and the command that applies it)</th>'
            '<th>change</th><th>estimate</th><th>fits</th><th>message</th></tr></thead>'
            f'<tbody>{rows}</tbody></table>')


def _fix_outcome(report: dict) -> str:
    fo = report.get("fix_outcome")
    if not isinstance(fo, dict):
        return ""
    check = _dict(fo.get("check"))
    what = check.get("what") or "peak"
    rows = [
        ("applied", f'<code>{_e(fo.get("applied") or "—")}</code>'),
        ("status", _badge(fo.get("status"))),
        (f"estimated {what}", _e(_bytes(check.get("estimate_bytes")))),
        (f"measured {what}", _e(_bytes(check.get("measured_bytes")))),
        ("peak allocated", _e(_bytes(fo.get("peak_allocated_bytes")))),
        ("evicted tokens (all layers, whole batch)", _e(_int(fo.get("evicted_tokens")))),
        ("run time", _e(_seconds(fo.get("seconds")))),
    ]
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in rows)
    if check and check.get("agrees"):
        verdict = '<p class="yes">The fixed run turned out as the fix estimated.</p>'
    elif check:
        items = "".join(f"<li>{_e(p)}</li>" for p in _list(check.get("problems")))
        verdict = ('<div class="differs"><p class="no">The fixed run differs from the fix\'s estimate:</p>'
                   f"<ul>{items}</ul></div>")
    else:
        verdict = ""
    return f'<section id="fix-outcome"><h2>Fix outcome</h2><dl class="meta">{dl}</dl>{verdict}</section>'


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
.figure { max-width: 250px; } .figure-sub { font-size: 14px; font-weight: 600; }
.figure-detail { color: var(--muted); font-size: 12px; margin-top: 2px; }
div.command { margin-top: 4px; } div.command code { font-size: 11px; overflow-wrap: anywhere; }
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
