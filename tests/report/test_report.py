"""The doctor's report: HTML rendering, escaping, atomic writing, output-directory checks, and a real browser."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kvscope.report import PLOT_IDS, REPORT_HTML, REPORT_JSON, SNAPSHOT_NAME, check_out_dir, render_html, write_report
from kvscope.report import write as write_mod

GIB = 1024**3
MIB = 1024**2
CHROMIUM = "/usr/bin/chromium"


# --------------------------------------------------------------------------------------------------------------------
# example reports


def oom_report() -> dict:
    """Llama 3 8B, batch 64 x 8192 prompt tokens, plain transformers on an H100 80GB: out of memory in prefill.

    The model is llama-3.1-8b (same weights, 16,060,522,496 bytes, and 131,072 KV bytes per token as llama-3-8b):
    llama-3-8b stops at 8192 positions, so 8192 prompt tokens + 128 new ones would be refused before running.
    Prediction and fixes are the planner's numbers for this workload.
    """
    weights = 16_060_522_496
    capacity = 85_017_493_504
    per_layer = 64 * 8192 * 4096  # 2 GiB of K and V per layer for the whole batch
    hidden = 64 * 8192 * 4096 * 2  # the bf16 residual stream, 4 GiB
    context_bytes = 560 * MIB  # CUDA context, outside PyTorch (NVML sees it)

    t, allocated, reserved, nvml, rss, cpu, util = [], [], [], [], [], [], []
    dt, load_end = 0.05, 8.4
    step = 0
    reserved_now = 0

    def sample(alloc: float, host: float, busy: float, slack: int = 96 * MIB) -> None:
        nonlocal step, reserved_now
        t.append(round(step * dt, 3))
        alloc = int(alloc)
        reserved_now = max(reserved_now, (alloc + 2 * MIB - 1) // (2 * MIB) * (2 * MIB) + slack)
        allocated.append(alloc)
        reserved.append(reserved_now)
        nvml.append(reserved_now + context_bytes)
        rss.append(int(host))
        cpu.append(round(busy, 1))
        util.append(round(min(100.0, busy * 0.9), 1))
        step += 1

    while step * dt < load_end:  # load: shards arrive in steps of about 1.9 GiB
        frac = step * dt / load_end
        shards = math.floor(frac * 8.5) / 8
        sample(weights * min(1.0, shards), 0.6 * GIB + 2.4 * GIB * frac, 100.0)
    layer_s = 0.75
    oom_layer = 14
    for layer in range(oom_layer + 1):  # prefill: each layer adds 2 GiB of KV and a transient MLP peak
        base = weights + hidden + layer * per_layer
        n = int(layer_s / dt)
        for i in range(n):
            phase = i / n
            spike = 25.0 * GIB * math.sin(math.pi * min(1.0, phase * 1.1)) ** 2
            if layer == oom_layer and phase > 0.45:
                break  # the allocation that did not fit
            kv = per_layer if phase > 0.3 else per_layer * phase / 0.3
            sample(base + spike + kv, 3.0 * GIB, 12.0, slack=1400 * MIB)  # freed MLP blocks fragment the pool
    oom_t = t[-1]

    stored_layers = oom_layer  # layers 0..13 cached the whole prompt; layer 14 failed in its MLP
    kv_layers = [  # tokens per sequence (as the doctor records them), bytes for the whole batch
        {"layer": i, "stored_tokens": 8192 if i < stored_layers else 0, "evicted_tokens": 0,
         "bytes": per_layer if i < stored_layers else 0, "capacity_tokens": 8192 if i < stored_layers else 0}
        for i in range(32)
    ]
    peak_alloc = max(allocated)
    peak_reserved = max(reserved)
    kv_now = stored_layers * per_layer
    activations = peak_alloc - weights - kv_now - 1_207_959_552
    fixes = [
        (1, "--batch 27", "reduce the batch to 27", 84_873_125_888,
         "37 fewer sequences per step (58% less throughput)"),
        (2, "--runtime kvscope --kv-dtype fp8", "store the KV cache as fp8", 64_887_267_328,
         "small quality cost; KV bytes per token 131072 -> 66560"),
        (3, "--runtime kvscope --kv-dtype int8", "store the KV cache as int8", 65_432_526_848,
         "perplexity within about 1%; KV bytes per token 131072 -> 67584"),
        (4, "--runtime kvscope --kv-dtype int4", "store the KV cache as int4", 50_148_483_072,
         "perplexity within about 5%; KV bytes per token 131072 -> 36864"),
        (5, "--runtime kvscope --budget 6301 --policy snapkv",
         "cap the KV cache at 6301 tokens per sequence with an eviction policy", 85_016_780_800,
         "keeps 76% of the tokens; quality depends on the policy"),
        (6, "--context 3463", "shorten the prompt to 3463 tokens", 85_010_980_864,
         "drops 4729 tokens of history (truncate or summarize it)"),
    ]
    return {
        "kvscope_version": "0.1.0",
        "created": "2026-11-22T14:03:11+00:00",
        "command": "kvscope doctor llama-3.1-8b --batch 64 --context 8192 --new-tokens 128 --out report-oom",
        "model": {"name": "llama-3.1-8b", "num_layers": 32, "hidden_size": 4096, "num_key_value_heads": 8,
                  "head_dim": 128, "dtype": "bf16", "weights_bytes": weights, "kv_bytes_per_token": 131072},
        "workload": {"batch": 64, "context": 8192, "new_tokens": 128, "runtime": "hf", "kv_dtype": "bf16",
                     "policy": None, "budget_tokens": None},
        "device": {"name": "NVIDIA H100 80GB HBM3", "cuda": True, "total_bytes": capacity,
                   "capacity_bytes": capacity, "emulated": False},
        "prediction": {"weights_bytes": weights, "kv_bytes": 68_719_476_736, "activation_bytes": 62_545_461_248,
                       "overhead_bytes": 30_782_849_024, "peak_bytes": 147_359_014_912, "capacity_bytes": capacity,
                       "fits": False},
        "outcome": {
            "status": "oom",
            "error": (f"CUDA out of memory. Tried to allocate 14.00 GiB. GPU 0 has a total capacity of 79.18 GiB of "
                      f"which {(capacity - peak_reserved - context_bytes) / GIB:.2f} GiB is free. Including "
                      f"non-PyTorch memory, this process has {(peak_reserved + context_bytes) / GIB:.2f} GiB memory "
                      f"in use. Of the allocated memory {peak_alloc / GIB:.2f} GiB is allocated by PyTorch, and "
                      f"{(peak_reserved - peak_alloc) / GIB:.2f} GiB is reserved by PyTorch but unallocated."),
            "peak_allocated_bytes": peak_alloc,
            "peak_reserved_bytes": peak_reserved,
            "seconds": oom_t,
            "failed_at": oom_t,
            "failed_in": "prefill",
        },
        "timeline": {"t": t, "allocated": allocated, "reserved": reserved, "nvml_used": nvml, "gpu_util": util,
                     "rss": rss, "cpu_percent": cpu},
        "phases": [
            {"name": "load", "start": 0.0, "end": load_end, "detail": "4 safetensors shards, bf16, to cuda:0"},
            {"name": "prefill", "start": load_end, "end": oom_t,
             "detail": "64 × 8192 prompt tokens in one forward pass (transformers generate)"},
        ],
        "kv_layers": kv_layers,
        "evictions": {"t": [], "evicted_tokens": []},
        "attribution": {"weights": weights, "kv_cache": kv_now, "activations": activations,
                        "other": 1_207_959_552, "fragmentation": peak_reserved - peak_alloc},
        "diagnosis": {
            "headline": "Out of memory in prefill: the KV cache for 64 × 8192 tokens does not fit beside the weights",
            "explanation": (
                "The run failed in layer 14 of the prefill. By then 14 of 32 layers had cached the whole prompt "
                "(28.00 GiB of KV at 131072 bytes per token), the weights took 14.96 GiB and the MLP of the "
                "current layer needed about 25 GiB of activations for 524288 tokens at once.\n"
                "The full run needs 165.91 GiB; the card has 79.18 GiB."),
            "figures": [
                {"label": "needed by the workload", "bytes": 178_141_863_936, "tokens": None,
                 "detail": "planner: peak allocated + overhead"},
                {"label": "available", "bytes": capacity, "tokens": None, "detail": ""},
                {"label": "held at the failure", "bytes": peak_alloc, "tokens": None,
                 "detail": "allocated by PyTorch in prefill; it asked for 14.00 GiB more"},
                {"label": "short by", "bytes": 178_141_863_936 - capacity, "tokens": None, "detail": ""},
                {"label": "needed by the applied fix", "bytes": 84_873_125_888, "tokens": None,
                 "detail": "--batch 27: estimated peak allocated; measured 77.50 GiB, as estimated"},
            ],
            "needed_bytes": 178_141_863_936,
            "available_bytes": capacity,
            "held_bytes": peak_alloc,
            "option": "--batch 27",
            "recommend_expandable_segments": False,
        },
        "fixes": [{"rank": r, "option": o, "change": c, "peak_bytes": p, "fits": True,
                   "message": f"{c}: needed 165.91 GiB, available 79.18 GiB; with {o} the estimate is "
                              f"{p / GIB:.2f} GiB (fits); {m}"} for r, o, c, p, m in fixes],
        "fix_outcome": {"applied": "reduce the batch to 27 (--batch 27)", "option": "--batch 27", "status": "ok",
                        "peak_allocated_bytes": 83_214_877_696, "seconds": 41.3,
                        "check": {"what": "peak allocated", "estimate_bytes": 83_050_000_000,
                                  "measured_bytes": 83_214_877_696, "agrees": True, "problems": []}},
        "snapshot": SNAPSHOT_NAME,
        "notes": [
            "NVML used includes 560.00 MiB of CUDA context that PyTorch does not count.",
            "Prefill ran the whole prompt in one pass; --runtime kvscope prefills in 512-token chunks and "
            "lowers the activation peak to about 2 GiB.",
        ],
    }


def cpu_report() -> dict:
    """SmolLM2-135M on a machine without CUDA: RSS only, an emulated 2 GiB budget, h2o evicting down to 1024 tokens."""
    layers, batch, context, new, budget = 30, 8, 4096, 256, 1024
    per_token_layer = 1536  # fp32 K and V: 3 heads x 64 dims x 2 x 4 bytes
    t, rss, cpu = [], [], []
    ev_t, ev = [], []
    load_end, prefill_end, decode_end = 1.2, 9.6, 14.4
    evicted = 0
    chunks = context // 512
    for i in range(int(decode_end / 0.05) + 1):
        now = round(i * 0.05, 3)
        t.append(now)
        if now < load_end:
            host = 420 * MIB + 540 * MIB * now / load_end
        elif now < prefill_end:
            host = 960 * MIB + 380 * MIB * min(1.0, (now - load_end) / 1.5) + 25 * MIB * math.sin(now * 9)
        else:
            host = 1340 * MIB + 6 * MIB * math.sin(now * 3)
        rss.append(int(host))
        cpu.append(195.0 if now >= load_end else 100.0)
    for c in range(chunks):  # after the cache holds `budget` tokens, each 512-token chunk evicts 512 per sequence
        now = load_end + (prefill_end - load_end) * (c + 1) / chunks
        if (c + 1) * 512 > budget:
            evicted += batch * 512 * layers
        ev_t.append(round(now, 3))
        ev.append(evicted)
    for s in range(new):  # each decoded token evicts one per sequence
        evicted += batch * layers
        if s % 16 == 15:
            ev_t.append(round(prefill_end + (decode_end - prefill_end) * (s + 1) / new, 3))
            ev.append(evicted)
    per_layer_evicted = batch * (context + new - 1 - budget)  # the cache counts evictions over the whole batch
    return {
        "kvscope_version": "0.1.0",
        "created": "2026-11-22T15:20:45+00:00",
        "command": ("kvscope doctor smollm2-135m --batch 8 --context 4096 --new-tokens 256 --runtime kvscope "
                    "--policy h2o --budget 1024 --gpu-memory 2GiB"),
        "model": {"name": "smollm2-135m", "num_layers": layers, "dtype": "fp32"},
        "workload": {"batch": batch, "context": context, "new_tokens": new, "runtime": "kvscope", "kv_dtype": "fp32",
                     "policy": "h2o", "budget_tokens": budget,
                     "kv_budget_bytes": batch * (budget + 512) * per_token_layer * layers},
        "device": {"name": "cpu (x86_64, 2 cores)", "cuda": False, "total_bytes": None,
                   "capacity_bytes": 2 * GIB, "emulated": True},
        "prediction": {"weights_bytes": 538_060_032, "kv_bytes": 566_231_040, "activation_bytes": 171_966_464,
                       "overhead_bytes": 718_077_952, "peak_bytes": 1_309_811_968, "capacity_bytes": 2 * GIB,
                       "fits": True},
        "outcome": {"status": "ok", "error": None, "peak_allocated_bytes": 1_251_031_040,
                    "peak_reserved_bytes": None, "seconds": decode_end},
        "timeline": {"t": t, "allocated": [], "reserved": [], "nvml_used": None, "gpu_util": None, "rss": rss,
                     "cpu_percent": cpu},
        "phases": [
            {"name": "load", "start": 0.0, "end": load_end, "detail": "embedded GGUF, cached as safetensors"},
            {"name": "prefill", "start": load_end, "end": prefill_end, "detail": "8 chunks of 512 tokens"},
            {"name": "decode", "start": prefill_end, "end": decode_end, "detail": "256 new tokens"},
        ],
        "kv_layers": [{"layer": i, "stored_tokens": budget, "evicted_tokens": per_layer_evicted,
                       "bytes": batch * (budget + 512) * per_token_layer, "capacity_tokens": budget + 512}
                      for i in range(layers)],
        "evictions": {"t": ev_t, "evicted_tokens": ev},
        "attribution": {"weights": 538_060_032, "kv_cache": 377_487_360, "activations": 271_581_184,
                        "other": 63_902_464, "fragmentation": 0},
        "diagnosis": {
            "headline": "Fits: peak 1.17 GiB of an emulated 2.00 GiB with h2o keeping 1024 tokens per sequence",
            "explanation": "No CUDA device: the peak is kvscope's live-tensor count; RSS is shown for the process.",
            "figures": [{"label": "peak process memory (RSS)", "bytes": 1_413_480_448, "tokens": None,
                         "detail": "measured on the CPU"},
                        {"label": "available", "bytes": 2 * GIB, "tokens": None, "detail": "--gpu-memory"}],
            "available_bytes": 2 * GIB,
            "option": None,
            "recommend_expandable_segments": False,
        },
        "fixes": [],
        "fix_outcome": None,
        "snapshot": None,
        "notes": ["The capacity is emulated (--gpu-memory 2GiB); nothing stops the process from using more."],
    }


@pytest.fixture
def report() -> dict:
    return oom_report()


# --------------------------------------------------------------------------------------------------------------------
# rendering


class _Dom(HTMLParser):
    """Collects the ids, the tags, the page's text, and what each chart says: the text and hover titles inside each
    plot SVG."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.svgs: dict[str, list[str]] = {}  # plot id -> its text and hover titles, in order
        self.titles: dict[str, list[str]] = {}  # plot id -> its hover titles alone
        self.ids: set[str] = set()
        self.tags: list[str] = []
        self._svg: str | None = None
        self._depth = 0
        self._in_title = False
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "svg" and self._svg is None:
            self._svg = a.get("id") or "?"
            self.svgs[self._svg], self.titles[self._svg] = [], []
            self._depth = 0
        self._in_title = tag == "title"
        if self._svg is not None:
            self._depth += 1

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if self._svg is not None:
            self._depth -= 1

    def handle_endtag(self, tag):
        self._in_title = False
        if self._svg is not None:
            self._depth -= 1
            if tag == "svg" and self._depth <= 0:
                self._svg = None

    def handle_data(self, data):
        self.text.append(data)
        if self._svg is not None and data.strip():
            self.svgs[self._svg].append(data.strip())
            if self._in_title:
                self.titles[self._svg].append(data.strip())


def parse(page: str) -> _Dom:
    dom = _Dom()
    dom.feed(page)
    dom.close()
    return dom


def says(dom: _Dom, pid: str) -> str:
    """Everything a chart says: its title, axis labels, ticks, legend, labels and hover texts."""
    return " | ".join(dom.svgs[pid])


def layer_titles(dom: _Dom) -> list[str]:
    return [t for t in dom.titles["plot-kv-layers"] if t.startswith("layer ")]


def test_render_has_plots_sections_and_diagnosis(report):
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    dom = parse(page)
    for pid, labels in (("plot-timeline", ("time (s)", "memory (GiB)")), ("plot-kv-layers", ("layer",
                        "tokens per sequence")), ("plot-attribution", ("memory (GiB)", "peak"))):
        assert pid in dom.svgs, pid
        for label in labels:
            assert label in dom.svgs[pid], f"{pid} needs the axis label {label!r}"
    timeline = dom.titles["plot-timeline"]
    for series in ("allocated", "reserved", "NVML used", "process RSS (host)"):  # each line, with its peak
        assert any(t.startswith(f"{series}: peak ") for t in timeline), series
        assert series in dom.svgs["plot-timeline"]  # and in the legend
    stored = [t for t in layer_titles(dom) if "8,192 tokens stored per sequence" in t]
    assert len(stored) == 14 and len(layer_titles(dom)) == 32  # 14 layers held the prompt when layer 14 failed
    assert "plot-evictions" not in dom.svgs and "plot-evictions" in dom.ids  # nothing was evicted
    text = " ".join(dom.text)
    assert "no data: no tokens were evicted" in text
    assert "time (s)" in text and "memory (GiB)" in text and "layer" in text and "tokens" in text
    assert report["diagnosis"]["headline"] in text
    assert "OOM" in text and "llama-3.1-8b" in text and "NVIDIA H100 80GB HBM3" in text
    assert "79.18 GiB" in text  # capacity, via format_bytes
    assert "165.91 GiB" in text  # needed
    for section in ("diagnosis", "timeline", "kv-layers", "evictions", "attribution", "prediction", "fixes",
                    "fix-outcome", "snapshot", "notes"):
        assert section in dom.ids, section
    assert "--runtime kvscope --budget 6301 --policy snapkv" in text
    assert "load" in text and "prefill" in text
    assert f'href="{SNAPSHOT_NAME}"' in page and "https://pytorch.org/memory_viz" in page


def test_render_is_self_contained(report):
    page = render_html(report)
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    assert "@import" not in page and "url(" not in page
    assert "src=" not in page
    # the only external address is the memory_viz link
    assert page.count("https://") == page.count("https://pytorch.org/memory_viz")


def test_cpu_report_draws_all_four_plots():
    rep = cpu_report()
    dom = parse(render_html(rep))
    for pid in PLOT_IDS:
        assert pid in dom.svgs, pid
        assert "time (s)" in dom.svgs[pid] or "layer" in dom.svgs[pid] or "peak" in dom.svgs[pid], pid
    series = [t.split(":")[0] for t in dom.titles["plot-timeline"] if ": peak " in t]
    assert series == ["process RSS (host)"]  # RSS only: no allocated/reserved/NVML on a CPU
    layers = layer_titles(dom)  # stored + evicted for each of the 30 layers
    assert len(layers) == 30 and all("1,024 tokens stored per sequence, 3,327 evicted per sequence" in t
                                     for t in layers)
    assert "stored per sequence" in dom.svgs["plot-kv-layers"] and "evicted per sequence" in dom.svgs["plot-kv-layers"]
    text = " ".join(dom.text)
    assert "process RSS (host)" in text and "capacity 2.00 GiB (emulated)" in text
    assert "no fixes were proposed" in text and "fix-outcome" not in dom.ids and "snapshot" not in dom.ids


def test_text_is_escaped(report):
    evil = "<script>alert('x')</script> & <img src=x onerror=alert(1)>"
    report["diagnosis"]["headline"] = evil
    report["diagnosis"]["explanation"] = evil
    report["model"]["name"] = "<b>llama</b>"
    report["phases"][0]["name"] = "<i>load</i>"
    report["phases"][0]["detail"] = '"><script>x</script>'
    report["notes"] = [evil]
    report["fixes"][0]["message"] = evil
    report["snapshot"] = 'a"b<c>.pickle'
    report["outcome"]["error"] = evil
    page = render_html(report)
    lower = page.lower()
    assert "<script" not in lower
    assert "<img" not in lower
    assert "<b>llama" not in page and "<i>load" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    dom = parse(page)
    assert "script" not in dom.tags and "img" not in dom.tags
    assert evil in " ".join(dom.text)  # shown as text, intact


@pytest.mark.parametrize("drop", ["timeline", "kv_layers", "evictions", "attribution"])
def test_missing_plot_data_says_no_data(report, drop):
    pid = {"timeline": "plot-timeline", "kv_layers": "plot-kv-layers", "evictions": "plot-evictions",
           "attribution": "plot-attribution"}[drop]
    del report[drop]
    dom = parse(render_html(report))
    assert pid not in dom.svgs
    assert pid in dom.ids
    assert f'<p class="no-data" id="{pid}">no data: ' in render_html(report)


def test_empty_and_odd_reports_render():
    for rep in ({}, {"timeline": {"t": [0.0, 1.0], "allocated": [], "reserved": None, "rss": [None, None]}},
                {"timeline": {"t": [0, 1, 2], "allocated": [1, float("nan"), "x"]}, "phases": [{"name": None}],
                 "kv_layers": [{"layer": 0}], "attribution": {"weights": 0}, "fixes": None, "notes": None,
                 "outcome": {"status": "weird"}, "diagnosis": None, "evictions": {"t": [1], "evicted_tokens": [0]}}):
        page = render_html(rep)
        dom = parse(page)
        assert "</html>" in page
        for pid in PLOT_IDS:
            assert pid in dom.ids
    dom = parse(render_html({}))
    assert sum("no data:" in s for s in dom.text) == 4


def test_long_timeline_is_reduced_but_keeps_the_peak():
    n = 200_000
    t = [i * 0.001 for i in range(n)]
    alloc = [GIB + (i % 1000) * MIB for i in range(n)]
    alloc[123_457] = 50 * GIB
    page = render_html({"timeline": {"t": t, "allocated": alloc}, "device": {"capacity_bytes": 80 * GIB}})
    assert len(page) < 400_000
    assert "peak 50.00 GiB" in page


# --------------------------------------------------------------------------------------------------------------------
# writing


def test_write_report_writes_json_html_and_snapshot(tmp_path, report):
    snap = tmp_path / "snap-src.pickle"
    snap.write_bytes(b"\x80\x04snapshot" * 100)
    out = tmp_path / "a" / "b" / "out"
    paths = write_report(out, report, snapshot_src=str(snap))
    assert paths == {"json": out / REPORT_JSON, "html": out / REPORT_HTML, "snapshot": out / SNAPSHOT_NAME}
    assert sorted(p.name for p in out.iterdir()) == sorted([REPORT_JSON, REPORT_HTML, SNAPSHOT_NAME])
    text = paths["json"].read_text()
    assert text.startswith('{\n  "kvscope_version"')  # indent 2
    assert json.loads(text) == report
    assert report["diagnosis"]["headline"] in paths["html"].read_text()
    assert paths["snapshot"].read_bytes() == snap.read_bytes()
    assert snap.exists()  # copied, not moved, by default
    assert not [p for p in (tmp_path / "a" / "b").iterdir() if p.name != "out"]  # no staging left behind


def test_write_report_moves_snapshot_and_keeps_other_files(tmp_path, report):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    snap = tmp_path / "snap.pickle"
    snap.write_bytes(b"data")
    rep = dict(report, snapshot=None)
    with pytest.raises(ValueError, match="not empty"):  # never among the files of another run, unless forced
        write_report(out, rep, snapshot_src=snap, move_snapshot=True)
    write_report(out, rep, snapshot_src=snap, move_snapshot=True, force=True)
    assert not snap.exists()
    assert (out / SNAPSHOT_NAME).read_bytes() == b"data"
    assert (out / "keep.txt").read_text() == "mine"
    assert json.loads((out / REPORT_JSON).read_text())["snapshot"] == SNAPSHOT_NAME
    assert rep["snapshot"] is None  # the caller's dict is not changed
    assert sorted(p.name for p in out.iterdir()) == sorted(["keep.txt", REPORT_JSON, REPORT_HTML, SNAPSHOT_NAME])


def test_write_report_into_an_empty_dir_and_through_a_symlink(tmp_path, report):
    empty = tmp_path / "empty"
    empty.mkdir()
    write_report(empty, report)
    assert empty.is_dir() and sorted(p.name for p in empty.iterdir()) == [REPORT_HTML, REPORT_JSON]
    mask = os.umask(0)
    os.umask(mask)
    assert empty.stat().st_mode & 0o777 == 0o777 & ~mask  # not the 0700 of a temporary directory

    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    write_report(link, report)
    assert link.is_symlink()  # filled, not replaced
    assert sorted(p.name for p in target.iterdir()) == [REPORT_HTML, REPORT_JSON]


def test_write_report_json_is_strict(tmp_path):
    write_report(tmp_path / "o", {"outcome": {"seconds": float("nan")}, "path": Path("/x"), "big": float("inf")})
    data = json.loads((tmp_path / "o" / REPORT_JSON).read_text())
    assert data == {"outcome": {"seconds": None}, "path": "/x", "big": None}


def test_write_report_replaces_an_old_report(tmp_path, report):
    out = tmp_path / "out"
    write_report(out, report)
    newer = copy.deepcopy(report)
    newer["diagnosis"]["headline"] = "second run"
    write_report(out, newer, force=True)
    assert "second run" in (out / REPORT_HTML).read_text()
    assert json.loads((out / REPORT_JSON).read_text())["diagnosis"]["headline"] == "second run"
    assert sorted(p.name for p in out.iterdir()) == [REPORT_HTML, REPORT_JSON]


def _boom(*args, **kwargs):
    raise RuntimeError("renderer crashed")


def _fail_on_html(real):
    def write_file(path, text):
        if Path(path).name == REPORT_HTML:
            Path(path).write_text(text[: len(text) // 2])  # half a page, then the crash
            raise OSError(28, "No space left on device")
        return real(path, text)

    return write_file


def _fail_snapshot_copy(src, dst, *args, **kwargs):
    Path(dst).write_bytes(b"half")
    raise OSError(28, "No space left on device")


FAILURES = {
    "render": ("render_html", _boom, RuntimeError),
    "html-write": ("_write_file", None, OSError),
    "snapshot-copy": ("_place_snapshot", _fail_snapshot_copy, OSError),
}


def _inject(monkeypatch, how):
    attr, fn, exc = FAILURES[how]
    if fn is None:
        fn = _fail_on_html(write_mod._write_file)
    monkeypatch.setattr(write_mod, attr, fn)
    return exc


@pytest.mark.parametrize("how", list(FAILURES))
def test_failed_write_leaves_nothing_in_a_fresh_dir(tmp_path, report, monkeypatch, how):
    parent = tmp_path / "parent"
    parent.mkdir()
    snap = tmp_path / "snap.pickle"
    snap.write_bytes(b"snapshot")
    exc = _inject(monkeypatch, how)
    with pytest.raises(exc):
        write_report(parent / "out", report, snapshot_src=snap)
    assert list(parent.iterdir()) == []  # no out dir, no staging directory
    assert snap.read_bytes() == b"snapshot"

    # an existing but empty directory stays empty
    (parent / "empty").mkdir()
    with pytest.raises(exc):
        write_report(parent / "empty", report, snapshot_src=snap)
    assert list((parent / "empty").iterdir()) == []
    assert sorted(p.name for p in parent.iterdir()) == ["empty"]


@pytest.mark.parametrize("how", list(FAILURES))
def test_failed_write_leaves_an_old_report_untouched(tmp_path, report, monkeypatch, how):
    out = tmp_path / "out"
    old_snap = tmp_path / "old.pickle"
    old_snap.write_bytes(b"old snapshot")
    write_report(out, report, snapshot_src=old_snap)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    stats = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    newer = copy.deepcopy(report)
    newer["diagnosis"]["headline"] = "a newer run"
    new_snap = tmp_path / "new.pickle"
    new_snap.write_bytes(b"new snapshot")
    exc = _inject(monkeypatch, how)
    with pytest.raises(exc):
        write_report(out, newer, snapshot_src=new_snap, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stats
    assert sorted(os.listdir(tmp_path)) == ["new.pickle", "old.pickle", "out"]


# --------------------------------------------------------------------------------------------------------------------
# the output directory


def test_check_out_dir_accepts_new_and_existing_dirs(tmp_path):
    assert check_out_dir(tmp_path) == tmp_path
    new = tmp_path / "x" / "y"
    assert check_out_dir(new) == new
    assert not (tmp_path / "x").exists()  # checking creates nothing
    assert os.listdir(tmp_path) == []


def test_a_file_as_out_dir_is_a_usage_error(tmp_path, report):
    f = tmp_path / "report.txt"
    f.write_text("not a dir")
    for target in (f, f / "sub"):
        with pytest.raises(ValueError) as err:
            check_out_dir(target)
        assert str(f) in str(err.value) and "--out" in err.value.cli_message()
        with pytest.raises(ValueError, match="change out"):  # the library names its parameter
            write_report(target, report)
    assert f.read_text() == "not a dir"


def test_unwritable_out_dir_is_a_usage_error(tmp_path, report, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        probe_works = os.access(locked, os.W_OK)  # root can write anyway: then fail the probe on purpose
        if probe_works:
            def refuse(*args, **kwargs):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(write_mod.tempfile, "mkstemp", refuse)
        for target in (locked, locked / "new" / "deeper"):
            with pytest.raises(ValueError) as err:
                check_out_dir(target)
            message = err.value.cli_message()
            assert str(target) in message and "not writable" in message and "--out" in message
        with pytest.raises(ValueError, match="not writable"):
            write_report(locked / "out", report)
        monkeypatch.undo()
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


# --------------------------------------------------------------------------------------------------------------------
# a real browser


def _chromium(args: list[str], profile: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"Chromium not installed at {CHROMIUM} "
                    "(CI installs it: apt-get install -y chromium)")
@pytest.mark.parametrize("example", ["oom", "cpu"])
def test_chromium_renders_the_report(tmp_path, example):
    rep = oom_report() if example == "oom" else cpu_report()
    paths = write_report(tmp_path / "out", rep)
    url = paths["html"].resolve().as_uri()
    profile = Path(tempfile.mkdtemp(prefix="kvscope-chromium-", dir=tmp_path))
    try:
        done = _chromium(["--dump-dom", url], profile)
        assert done.returncode == 0, done.stderr[-2000:]
        dom = parse(done.stdout)
        expected = PLOT_IDS if example == "cpu" else ("plot-timeline", "plot-kv-layers", "plot-attribution")
        for pid in expected:
            assert pid in dom.svgs, f"{pid} missing from the browser's DOM"
        assert "time (s)" in dom.svgs["plot-timeline"] and "memory (GiB)" in dom.svgs["plot-timeline"]
        assert any(": peak " in t for t in dom.titles["plot-timeline"])  # the lines the browser drew, with peaks
        assert len(layer_titles(dom)) == (30 if example == "cpu" else 32)  # a bar per layer
        assert rep["diagnosis"]["headline"] in " ".join(dom.text)
        if example == "oom":
            assert "no data: no tokens were evicted" in " ".join(dom.text)

        shot = tmp_path / f"shot-{example}.png"
        done = _chromium([f"--screenshot={shot}", "--window-size=1280,2400", url], profile)
        assert done.returncode == 0, done.stderr[-2000:]
        assert shot.exists(), done.stderr[-2000:]
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 50_000, f"screenshot is only {len(data)} bytes"
        keep = os.environ.get("KVSCOPE_KEEP_SCREENSHOTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(keep) / shot.name)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
