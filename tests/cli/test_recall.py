"""`--recall cpu` on the CLI: the plan prices its host memory, impossible combinations are usage errors (exit 2, one
line, no traceback), and a run with it keeps its budget."""

from __future__ import annotations

import json

import pytest

from kvscope.models.loader import spec_for
from kvscope.planner.memory import kv_bytes, recall_host_bytes
from kvscope.planner.workload import Workload
from tests.cli.test_cli import run


def test_plan_prices_the_recall_tier(capsys):
    code, out, _ = run(capsys, "plan", "llama-3.1-8b", "--batch", "2", "--context", "32768", "--new-tokens", "16",
                       "--runtime", "kvscope", "--policy", "snapkv", "--budget", "2048", "--recall", "cpu",
                       "--format", "json")
    assert code == 0
    d = json.loads(out)
    spec = spec_for("llama-3.1-8b")
    w = Workload(batch=2, context=32768, new_tokens=16, runtime="kvscope", budget_tokens=2048, policy="snapkv",
                 recall="cpu")
    # bf16: 32 layers x 8 KV heads x two records a slot: position, score, keys and validity (8 + 4 + 256 + 1, padded
    # to 272 B), then the values (256 B)
    assert d["host_bytes"] == recall_host_bytes(spec, w) == 32 * 2 * 8 * 32768 * (272 + 256)
    code, out, _ = run(capsys, "plan", "llama-3.1-8b", "--context", "32768", "--runtime", "kvscope", "--budget", "2048",
                       "--policy", "snapkv", "--format", "json")
    assert json.loads(out)["host_bytes"] == 0


@pytest.mark.parametrize("argv, fragment", [
    (["plan", "llama-3-8b", "--recall", "cpu"], "needs kvscope's cache"),
    (["run", "smollm2-135m", "--policy", "streaming_llm", "--budget", "64", "--recall", "cpu", "--prompt", "hi"],
     "reads no attention"),
    (["doctor", "smollm2-135m", "--device", "cpu", "--batch", "1", "--context", "200", "--new-tokens", "4",
      "--runtime", "kvscope", "--policy", "sliding_window", "--budget", "64",
      "--recall", "cpu", "--out", "/tmp/never"], "reads no attention"),
    (["run", "smollm2-135m", "--policy", "snapkv", "--recall", "gpu", "--prompt", "hi"], "invalid choice"),
])
def test_impossible_recall_exits_2_with_one_line(capsys, argv, fragment):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert fragment in err
    assert "Traceback" not in err
    assert fragment in err.strip().splitlines()[-1]


def test_run_with_recall_on_the_embedded_model(capsys):
    code, out, err = run(capsys, "run", "smollm2-135m", "--device", "cpu", "--policy", "snapkv", "--budget", "40",
                         "--chunk-size", "32", "--recall", "cpu", "--new-tokens", "4", "--format", "json",
                         "--prompt", "The quick brown fox jumps over the lazy dog. " * 12 + "What jumps?")
    assert code == 0, err
    d = json.loads(out)
    assert d["recall"] == "cpu" and 0 < d["recalled_tokens"] <= 40
    assert d["prompt_tokens"] > 40 + 32 and max(layer["stored_tokens"] for layer in d["layers"]) <= 40


def test_recall_without_the_host_memory_for_its_tier_exits_2(capsys, monkeypatch):
    import psutil

    spec = spec_for("smollm2-135m")
    cache = kv_bytes(spec, Workload(batch=1, context=2000, new_tokens=4, dtype="fp32", runtime="kvscope",
                                    budget_tokens=40, chunk_size=32))

    class Host:  # room for the budgeted cache (40 + one 32-token chunk), not for a ~600-token prompt's tier
        available = 2 * cache
        total = 2 * cache

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Host())
    code, out, err = run(capsys, "run", "smollm2-135m", "--device", "cpu", "--policy", "snapkv", "--budget", "40",
                         "--chunk-size", "32", "--recall", "cpu", "--new-tokens", "4",
                         "--prompt", "The quick brown fox jumps over the lazy dog. " * 60 + "What jumps?")
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "of host memory" in last and "is available" in last and "--recall" in last
