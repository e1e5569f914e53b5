"""benchmarks/weights.py without a GPU: the GPU JSON's decode summary (what the planner's advice reads) and both
sections rendered from data, including a run cut short."""

from __future__ import annotations

import argparse
import json
import time

import pytest
from benchmarks import common

from kvscope.planner import measured
from tests.bench import load_benchmark

wb = load_benchmark("weights")
META = {"device": "NVIDIA H200", "date": "2026-12-02", "commit": "abc1234", "command": "python -m benchmarks.weights"}


def cuda_run() -> dict:
    return {"meta": META, "model": "llama-3.1-8b", "device": "NVIDIA H200", "total_bytes": 150_109_880_320,
            "decode_context": 1024, "decode_new": 64, "capacity_context": 4096, "capacity_new": 16, "decode": {},
            "formats": {
                "bf16": {"allocated_bytes": 16_060_522_752, "planned_bytes": 16_060_522_496, "error_pct": 0.0,
                         "decode": {"1": {"tps": 200.0}, "32": {"tps": 150.0}}, "prefill": {"tps": 20000.0},
                         "capacity": {"predicted": 237, "skipped": "9 s left of --deadline 105"}},
                "int4": {"allocated_bytes": 5_809_700_000, "planned_bytes": 5_809_643_520, "error_pct": 0.001,
                         "decode": {"1": {"tps": 300.0}, "32": {"tps": None, "error": "auto: RuntimeError: x"}},
                         "prefill": {"tps": 5000.0},
                         "capacity": {"predicted": 255, "ok": True, "peak": 100 * 2**30, "planned_peak": 101 * 2**30}},
                "int8": {"error": "load: ImportError: no"}}}


def test_the_decode_summary_is_what_the_advice_reads(tmp_path, monkeypatch):
    data = cuda_run()
    wb._save(argparse.Namespace(out=str(tmp_path)), wb.CUDA_FILE, data)
    saved = json.loads((tmp_path / wb.CUDA_FILE).read_text())
    assert saved["decode"] == {"bf16": {"1": 200.0, "32": 150.0}, "int4": {"1": 300.0}, "int8": {}}
    monkeypatch.setattr(measured, "DATA", tmp_path)
    measured._read.cache_clear()
    try:
        assert measured.decode_change("int4") == "decode 200 -> 300 tok/s at batch 1 (+50%) (llama-3.1-8b on NVIDIA " \
            "H200)"
        assert measured.decode_change("int8") == "decode speed not measured"
    finally:
        measured._read.cache_clear()


def test_sections_render_from_data(tmp_path, monkeypatch):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n")
    monkeypatch.setattr(common, "DOCS", page)
    cpu = {"meta": META | {"device": "CPU"}, "model": "smollm2-135m", "device": "CPU", "dtype": "fp32",
           "ppl_tokens": 2048, "ppl_chunk": 64, "not_runnable": {"int4": "--weights int4 needs a CUDA GPU"},
           "rows": [{"weights": "dense", "perplexity": 20.0, "passkey_2k": "6/6", "weights_bytes": 400,
                     "planned_bytes": 400, "seconds": 10},
                    {"weights": "int8", "perplexity": 20.2, "passkey_2k": "5/6", "weights_bytes": 100,
                     "planned_bytes": 100, "seconds": 12}]}
    common.save_json(cpu, tmp_path / wb.CPU_FILE)
    common.save_json(cuda_run(), tmp_path / wb.CUDA_FILE)
    assert wb.render(tmp_path) == ["weights-cpu", "weights-cuda"]
    text = page.read_text()
    assert "| int8 | 20.2 | +1.00% | 5/6 | 100 | 100 | 75% | 12 |" in text
    assert "- int4: not run on the CPU: --weights int4 needs a CUDA GPU" in text
    row = "| int4 | 5,809,700,000 | 5,809,643,520 | +0.001% | 300.0 (1.50x) | auto: RuntimeError: x | " \
        "5,000 (0.25x) | 255 | ran, peak 100.00 GiB, planned 101.00 GiB (+1.00%) |"
    assert row in text
    assert "| bf16 | 16,060,522,752 | 16,060,522,496 | +0.000% | 200.0 | 150.0 | 20,000 | 237 | not run (9 s left of " \
        "--deadline 105) |" in text
    missing = " | ".join(["not measured"] * 5)
    assert f"| int8 | 0 | 0 | load: ImportError: no | {missing} |" in text
    assert "rebuild this section with `python -m benchmarks.weights --render`" in text


@pytest.mark.parametrize("predicted,largest,want", [(248, 246, [248, 247, 246]), (244, 246, [244, 245, 246, 247]),
                                                    (246, 246, [246, 247])])
def test_capacity_probes_walk_to_the_boundary(monkeypatch, predicted, largest, want):
    """From the planner's batch, one less after an OOM, one more after a fit, until a fit sits next to an OOM."""
    monkeypatch.setattr(wb, "_capacity_run", lambda model, spec, batch: {"ok": batch <= largest, "batch": batch})
    args = argparse.Namespace(capacity_probes=8, deadline=1e9, capacity_seconds=0)
    probes = wb._capacity_probes(None, None, predicted, args, time.monotonic())
    assert [p["batch"] for p in probes] == want
    cell = wb._capacity_cell({"probes": probes})
    assert f"{largest}: ran" in cell and f"{largest + 1}: OOM" in cell


def test_capacity_probes_stop_at_their_count(monkeypatch):
    monkeypatch.setattr(wb, "_capacity_run", lambda model, spec, batch: {"ok": False, "batch": batch})
    args = argparse.Namespace(capacity_probes=2, deadline=1e9, capacity_seconds=0)
    assert [p["batch"] for p in wb._capacity_probes(None, None, 248, args, time.monotonic())] == [248, 247]
