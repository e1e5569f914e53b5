"""Watch a running vLLM, SGLang or kvscope server's Prometheus /metrics: KV usage, preemptions or retractions per
minute, prefix-cache hit rate, queue and time to first token per interval, then findings with the numbers behind them.

The engine is recognised from its metric names. --format json prints one JSON object per interval (JSON Lines) and a
last line {"summary": ...}."""

from __future__ import annotations

import json
import sys

from kvscope.cli import output

HELP = "watch a vLLM / SGLang / kvscope server's /metrics and flag KV pressure, preemption storms, queueing"
LIVE_ROWS = 12  # intervals kept on screen in the live table


def add_arguments(p) -> None:
    p.add_argument("url", metavar="URL", help="the server's metrics URL, e.g. http://127.0.0.1:8000/metrics "
                   "(host:port alone means http://host:port/metrics)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between scrapes (default 5)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds to watch, then print the summary (default: until Ctrl-C)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for one scrape (default 5)")
    output.add_format(p)


def run(args) -> int:
    from kvscope.engines.watch import Watcher
    from kvscope.errors import require_positive

    if args.duration is not None:
        require_positive("duration", args.duration, option="--duration")
        if args.duration < args.interval:
            from kvscope.errors import usage

            raise usage(f"--duration {args.duration:g} is shorter than one --interval {args.interval:g}",
                        expected="a duration of at least one interval", fix="--duration or --interval")
    require_positive("timeout", args.timeout, option="--timeout")
    watcher = Watcher(args.url, interval_s=args.interval, timeout_s=args.timeout)
    metrics = watcher.start()
    if args.format == "json":
        _run_json(watcher, args.duration)
    else:
        _run_table(watcher, args.duration, metrics)
    summary = watcher.summary()
    if args.format == "json":
        sys.stdout.write(json.dumps({"summary": summary}, default=str) + "\n")
    else:
        render_summary(summary)
    if watcher.stopped:
        output.stderr.print(f"kvscope watch: {watcher.stopped}")
        return 1
    return 0


def _loop(watcher, duration, on_record) -> None:
    try:
        if duration is None:
            while watcher.stopped is None:
                rec = watcher.step()
                if rec is not None:
                    on_record(rec)
        else:
            watcher.run(duration, on_record)
    except KeyboardInterrupt:  # Ctrl-C ends the watch; the summary of what was seen still prints
        pass


def _run_json(watcher, duration) -> None:
    def emit(rec) -> None:
        sys.stdout.write(json.dumps(rec.to_dict()) + "\n")
        sys.stdout.flush()

    _loop(watcher, duration, emit)


def _run_table(watcher, duration, metrics) -> None:
    header = f"{metrics.engine} at {watcher.url} ({metrics.versions}), every {watcher.interval_s:g} s"
    if not sys.stdout.isatty():
        _loop(watcher, duration, lambda rec: None)
        output.stdout.print(records_table(watcher.records, metrics, header))
        return
    from rich.live import Live

    with Live(records_table([], metrics, header), console=output.stdout, refresh_per_second=4) as live:
        _loop(watcher, duration, lambda rec: live.update(records_table(watcher.records[-LIVE_ROWS:], metrics, header)))


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def _num(v, fmt: str = "{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _secs(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _k(v) -> str:
    """Token counts compactly: 471,240 -> 471k."""
    if v is None:
        return "-"
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.0f}k" if v >= 1e4 else f"{v:,.0f}"


def records_table(records, metrics, title: str):
    from rich import box
    from rich.table import Table

    t = Table(title=title + "; TTFT in seconds", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    short = {"preemptions": "preempt", "retractions": "retract", "swaps out + drops": "swap out"}
    for col in ("t s", "KV use", "used/pool", "run", "wait", f"{short[metrics.preempt_label]}/min", "hit",
                "TTFT p50", "p95"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in records:
        t.add_row(f"{r.t_s:.1f}", _pct(r.kv_usage), f"{_k(r.kv_used_tokens)}/{_k(r.kv_capacity_tokens)}",
                  _num(r.running), _num(r.waiting), _num(r.preemptions_per_min, "{:.1f}"), _pct(r.prefix_hit_rate),
                  _secs(r.ttft_p50_s), _secs(r.ttft_p95_s))
    return t


def render_summary(s: dict) -> None:
    t = s["totals"]
    rows = [
        ("engine", f"{s['engine']} ({s['versions']})"),
        ("watched", f"{s['intervals']} intervals, {s['duration_s']:.1f} s"),
        ("KV usage mean / max", f"{_pct(t['kv_usage_mean'])} / {_pct(t['kv_usage_max'])}"),
        (t["preempt_label"], f"{_num(t['preemptions'])} ({_num(t['preemptions_per_min'], '{:.1f}')}/min)"),
        ("prefix-cache hit rate", _pct(t["prefix_hit_rate"])),
        ("waiting requests, mean", _num(t["waiting_mean"], "{:.1f}")),
        ("TTFT p95, worst interval (s)", _secs(t["ttft_p95_max_s"])),
    ]
    if s["not_exposed"]:
        rows.append(("not exposed by this server", ", ".join(s["not_exposed"])))
    output.stdout.print(output.kv_table("Summary", rows))
    if not s["findings"]:
        output.stdout.print("No findings: no sustained KV pressure, storm, queueing or low hit rate in this window.")
    from rich.markup import escape

    for f in s["findings"]:
        output.stdout.print(f"[bold]{escape(f['title'])}[/bold]: {escape(f['detail'])}.\n  fix: {escape(f['fix'])}.",
                            highlight=False)
