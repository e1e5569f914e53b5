"""benchmarks/multiturn.py on a tiny random Llama: the three ways agree under `full`, kvscope prefills only the new
tokens, turns are bounded by the model's positions, and writing keeps other devices' data and sections."""

from __future__ import annotations

import argparse
import json

from tests.bench import load_benchmark
from tests.conftest import build_tiny

mt = load_benchmark("multiturn")


def args(**kw):
    return argparse.Namespace(**({"reply_tokens": 10, "check_tokens": 4, "chunk_size": 32, "kv_dtype": None,
                                  "turns": 3} | kw))


def test_three_turns_agree_and_reuse(tmp_path, monkeypatch):
    model = build_tiny()
    case = mt.run_case(model, 256, args(), user=40, turns=3)
    rows = case["rows"]
    assert [r["prompt_tokens"] for r in rows] == [40, 90, 140]
    assert all(r["carried_same"] and r["kvscope_same"] for r in rows)
    # after turn 1 kvscope prefills the rest of the reply (10 tokens, 3 of them generated and held) and the new user
    # tokens
    assert [r["kvscope_prefilled"] for r in rows] == [40, 47, 47]
    assert [r["kvscope_reused"] for r in rows] == [0, 43, 93]
    assert [r["kvscope_rewinds"] for r in rows] == [0, 0, 0]
    assert case["idle_session"]["recomputed_tokens"] == 150 and "swap_note" in case["idle_session"]
    meta = {"device": "CPU", "date": "2026-12-02", "commit": "abc1234", "command": "python -m benchmarks.multiturn"}
    result = {"meta": meta, "model": "tiny", "device_kind": "cpu", "dtype": "torch.float32", "chunk_size": 32,
              "cpus": 2, "load_average": [0.5, 0.7], "cases": [case]}
    text = mt.render(result)
    assert "| 3 | 140 |" in text and "yes / yes" in text and "Load average" in text
    assert "- commit: abc1234" in text
    assert "python -m benchmarks.multiturn --render docs/data/multiturn-cpu.json" in text
    assert mt.section(result) == "multiturn-cpu"
    saved = tmp_path / "multiturn-cpu.json"
    saved.write_text(json.dumps(result))
    page = tmp_path / "benchmarks.md"
    monkeypatch.setattr(mt, "write_section", lambda name, md: page.write_text(f"{name}\n{md}"))
    mt.main(["--render", str(saved)])  # a saved run becomes its section again
    assert page.read_text() == f"multiturn-cpu\n{text}"


def test_turns_are_bounded_by_the_positions():
    assert mt.plan_turns(args(turns=10, reply_tokens=100, check_tokens=8), 8192, 900) == 8
    assert mt.plan_turns(args(turns=10, reply_tokens=100, check_tokens=8), 131072, 3900) == 10
