"""The report's figures say what they are: the failure where it happened, labelled headline cards, per-sequence KV
bars with the budget drawn, CPU charts scaled to what was measured, and a fix checked against its own estimate."""

from __future__ import annotations

import copy
import re

from kvscope.report import figures, render_html
from kvscope.report.model import DoctorReport
from tests.report.test_report import GIB, MIB, cpu_report, oom_report, parse, says


def _says(page: str, pid: str) -> str:
    return says(parse(page), pid)


def _with_fix_run(report: dict, longer: float = 30.0) -> dict:
    """The OOM report followed by a fix re-run of `longer` seconds, as the doctor's timeline has it."""
    rep = copy.deepcopy(report)
    tl = rep["timeline"]
    end = tl["t"][-1]
    seconds = end + longer
    for i in range(1, 41):
        tl["t"].append(round(end + (seconds - end) * i / 40, 3))
        for key in ("allocated", "reserved", "nvml_used", "rss"):
            tl[key].append(tl[key][0])
        tl["cpu_percent"].append(10.0)
        tl["gpu_util"].append(10.0)
    rep["phases"].append({"name": "fix", "start": end + 0.5, "end": end + 0.6, "detail": "--batch 27"})
    rep["phases"].append({"name": "fix: prefill", "start": end + 0.6, "end": seconds, "detail": ""})
    return rep


def test_the_failure_marker_sits_at_the_failure_not_at_the_end_of_the_fix_run():
    rep = _with_fix_run(oom_report())
    failed_at, end = rep["outcome"]["failed_at"], rep["timeline"]["t"][-1]
    dom = parse(render_html(rep))
    markers = [t for t in dom.titles["plot-timeline"] if " at " in t and t.endswith(" s")]
    assert markers == [f"OOM at {failed_at:.2f} s"]  # one marker, at the failure's own time
    assert failed_at < rep["phases"][-2]["start"] < end - 20  # before the fix, far from the end of the timeline
    assert f"OOM at {failed_at:.2f} s" in says(dom, "plot-timeline")  # its label on the chart


def test_headline_cards_are_labelled_and_a_fix_card_needs_an_applied_fix():
    page = render_html(oom_report())
    labels = re.findall(r'<div class="figure-label">([^<]*)</div>', page)
    assert labels == ["needed by the workload", "available", "held at the failure", "short by",
                      "needed by the applied fix"]
    assert "estimate after the fix" not in page
    rep = oom_report()
    rep["fix_outcome"] = None
    rep["diagnosis"]["figures"] = rep["diagnosis"]["figures"][:-1]
    page = render_html(rep)
    assert "applied fix" not in page and "after the fix" not in page
    cpu = render_html(cpu_report())
    assert "fix" not in " ".join(re.findall(r'<div class="figure-label">([^<]*)</div>', cpu))


def test_kv_bars_are_per_sequence_with_the_budget_drawn():
    rep = cpu_report()  # batch 8, budget 1024, 4096 + 256 tokens: 4351 KV tokens per sequence
    page = render_html(rep)
    svg = _says(page, "plot-kv-layers")
    assert "1,024 tokens stored per sequence, 3,327 evicted per sequence" in svg  # 1024 + 3327 = 4351
    assert "budget 1,024 tokens" in svg and "budget" in parse(page).svgs["plot-kv-layers"]  # its line and legend
    top = figures.kv_layers(DoctorReport.from_dict(rep)).ylim[1]
    assert 4351 <= top < 2 * 4351  # not the batch's 8 x 3327 evictions stacked on one sequence's tokens
    caption = parse(page).text
    assert any("Tokens are per sequence and layer (batch of 8)" in t for t in caption)
    assert any("Bytes are the whole batch's" in t for t in caption)


def test_cpu_timeline_is_scaled_to_what_was_measured_and_draws_the_kv_budget():
    rep = cpu_report()
    rep["device"]["capacity_bytes"] = int(23.5 * GIB)  # host memory
    rep["kv_timeline"] = {"t": [1.5, 9.6], "bytes": [100 * MIB, 188 * MIB], "stored_tokens": [512, 1024]}
    svg = _says(render_html(rep), "plot-timeline")
    top = figures.timeline(DoctorReport.from_dict(rep)).ylim[1]
    assert top <= 1.5 * GIB  # the 1.35 GiB RSS, not 23.5 GiB of RAM
    assert "capacity 23.50 GiB" not in svg and "memory (GiB)" in svg
    assert "KV budget 540.00 MiB (budget + one chunk)" in svg and "KV cache (allocated)" in svg


def test_a_fix_that_differs_from_its_estimate_is_said_so():
    rep = oom_report()
    rep["fix_outcome"]["check"] = {"what": "KV storage", "estimate_bytes": 2_946_560, "measured_bytes": 10_800_000,
                                   "agrees": False, "problems": ["its measured KV storage 10.30 MiB differs from the "
                                                                 "fix's estimate 2.81 MiB (+266.5%)"]}
    page = render_html(rep)
    assert "differs from the fix&#x27;s estimate" in page and "10.30 MiB differs" in page
    rep["fix_outcome"]["check"]["agrees"] = True
    assert "turned out as the fix estimated" in render_html(rep)
