"""`kvscope profile` and `kvscope.profile.profile_workload` on the tiny random Llama (CPU, a second or two each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvscope.cli.main import main
from kvscope.errors import UsageError
from kvscope.profile import profile_workload
from kvscope.profile.outputs import prepare_out_dir
from tests.conftest import TINY, build_tiny

LAYERS = TINY["num_hidden_layers"]
RANGES = {f"kvscope/layer_{i}" for i in range(LAYERS)} | {"kvscope/prefill", "kvscope/decode"}
JSON_KEYS = {"trace", "tensorboard_dir", "phases", "layers", "top_ops_time", "top_ops_memory"}


@pytest.fixture(scope="module")
def model():
    return build_tiny()


def prompt(batch: int = 2, tokens: int = 12) -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (batch, tokens), generator=torch.Generator().manual_seed(0))


def trace_names(path: str) -> set[str]:
    events = json.loads(Path(path).read_text())["traceEvents"]
    return {e.get("name", "") for e in events}


def layer_hook_counts(model) -> list[tuple[int, int]]:
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.model.layers]


def test_hf_generate_profile(model, tmp_path):
    before = layer_hook_counts(model)
    r = profile_workload(model, prompt(), None, max_new_tokens=3, chunk_size=8, out_dir=tmp_path / "p", top=5)
    assert r.runtime == "hf" and r.batch == 2 and r.prompt_tokens == 12

    assert trace_names(r.trace) >= RANGES  # valid JSON, with our layer and phase ranges in it
    tb = Path(r.tensorboard_file)
    assert tb.parent.parent == Path(r.tensorboard_dir) and tb.name.endswith(".pt.trace.json")
    assert trace_names(str(tb)) >= RANGES

    assert [row["layer"] for row in r.layers] == list(range(LAYERS))
    for row in r.layers:  # generate(): one prefill forward, then one forward per further token
        assert row["calls"] == 3 and row["total_ms"] > 0 and row["prefill_ms"] > 0 and row["decode_ms"] > 0
    assert r.phases["prefill_seconds"] > 0 and r.phases["decode_seconds"] > 0

    assert 0 < len(r.top_ops_time) <= 5 and 0 < len(r.top_ops_memory) <= 5
    assert not any(op["name"].startswith("kvscope/") for op in r.top_ops_time + r.top_ops_memory)
    times = [op["self_cpu_ms"] for op in r.top_ops_time]
    assert times == sorted(times, reverse=True)
    assert all(op["self_cpu_memory_bytes"] > 0 for op in r.top_ops_memory)
    assert set(r.to_dict()) >= JSON_KEYS
    assert layer_hook_counts(model) == before  # hooks removed afterwards


def test_kvscope_runtime_profile(model, tmp_path):
    from kvscope.cache.budgeted import BudgetedCache

    cache = BudgetedCache(model, "lru", budget_tokens=8, chunk_size=4)
    r = profile_workload(model, prompt(tokens=12), cache, max_new_tokens=3, chunk_size=4, out_dir=tmp_path)
    assert r.runtime == "kvscope" and trace_names(r.trace) >= RANGES
    assert [row["calls"] for row in r.layers] == [3 + 2] * LAYERS  # three prefill chunks, two decode steps
    assert r.phases["prefill_seconds"] > 0 and r.phases["decode_seconds"] > 0
    assert cache.stats().evicted_tokens > 0  # the profiled run really went through the budgeted cache


def test_failed_run_keeps_earlier_trace_and_removes_hooks(model, tmp_path, monkeypatch):
    first = profile_workload(model, prompt(1, 4), None, max_new_tokens=2, out_dir=tmp_path)
    earlier = Path(first.trace).read_bytes()
    before = layer_hook_counts(model)

    def broken(model, ids, mask, *args):
        model(input_ids=ids, attention_mask=mask)
        raise RuntimeError("boom")

    monkeypatch.setattr("kvscope.profile.profiler._generate_hf", broken)
    with pytest.raises(RuntimeError, match="boom"):
        profile_workload(model, prompt(1, 4), None, max_new_tokens=2, out_dir=tmp_path)
    assert Path(first.trace).read_bytes() == earlier
    assert layer_hook_counts(model) == before


def test_library_refuses_bad_arguments(model, tmp_path):
    with pytest.raises(UsageError, match="nvtx=True"):
        profile_workload(model, prompt(), None, max_new_tokens=2, out_dir=tmp_path, nvtx=True)
    with pytest.raises(UsageError, match="prompt is empty"):
        profile_workload(model, torch.zeros(1, 0, dtype=torch.long), None, out_dir=tmp_path)
    with pytest.raises(UsageError, match="max_new_tokens"):
        profile_workload(model, prompt(), None, max_new_tokens=0, out_dir=tmp_path)


def test_out_dir_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(UsageError, match="change out") as exc:
            prepare_out_dir(bad)
        assert str(bad) in str(exc.value)
    (tmp_path / "ok" / "trace.json").mkdir(parents=True)
    with pytest.raises(UsageError, match="trace.json is a directory"):
        prepare_out_dir(tmp_path / "ok")
    assert prepare_out_dir(tmp_path / "new" / "dir").is_dir()


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json(capsys, tiny_model_dir, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "profile", tiny_model_dir, "--context", 10, "--batch", 2, "--new-tokens", 3,
                         "--out", out_dir, "--format", "json", "--no-warmup")
    assert code == 0, err
    d = json.loads(out)
    assert set(d) >= JSON_KEYS
    assert Path(d["trace"]) == out_dir / "trace.json" and trace_names(d["trace"]) >= RANGES
    assert Path(d["tensorboard_dir"]) == out_dir / "tensorboard" and Path(d["tensorboard_file"]).is_file()
    assert set(d["phases"]) == {"prefill_seconds", "decode_seconds"} and min(d["phases"].values()) > 0
    assert [row["layer"] for row in d["layers"]] == list(range(LAYERS))
    assert {"layer", "self_ms", "total_ms", "calls"} <= set(d["layers"][0])
    assert d["top_ops_time"] and d["top_ops_memory"] and d["prompt_tokens"] == 10 and d["batch"] == 2


def test_cli_table_kvscope_runtime(capsys, tiny_model_dir, tmp_path):
    code, out, err = run(capsys, "profile", tiny_model_dir, "--context", 12, "--new-tokens", 2, "--runtime",
                         "kvscope", "--policy", "lru", "--budget", 8, "--chunk-size", 4, "--out", tmp_path / "p")
    assert code == 0, err
    assert "Time per decoder layer" in out and "Top operators by self time" in out and "self memory" in out
    assert "Chrome trace" in out and "prefill" in out and "decode" in out
    assert (tmp_path / "p" / "tensorboard" / "tiny_kvscope_lru_8").is_dir()


@pytest.mark.parametrize("extra, fragment", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "   "], "the prompt is empty"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "prompt file not found: /nonexistent/prompt.txt"),
    (["--prompt", "hello"], "has no tokenizer"),
    (["--context", "8", "--nvtx"], "--nvtx"),
    (["--context", "8", "--policy", "lru"], "--runtime kvscope"),
    (["--context", "8", "--kv-dtype", "int8"], "--kv-dtype configures kvscope's cache"),
    (["--context", "8", "--chunk-size", "4"], "--chunk-size configures kvscope's cache"),
    (["--context", "8", "--runtime", "kvscope", "--policy", "nope"], "unknown policy 'nope'"),
    (["--context", "0"], "context must be a positive"),
    (["--context", "5000"], "supports 1024"),
    (["--context", "8", "--batch", "0"], "batch must be a positive"),
])
def test_cli_bad_input_exit_2_one_line(capsys, tiny_model_dir, tmp_path, extra, fragment):
    code, out, err = run(capsys, "profile", tiny_model_dir, *extra, "--out", tmp_path / "o", "--no-warmup")
    assert code == 2, err
    assert fragment in err and "change " in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and out == ""


def test_cli_bad_out_dir(capsys, tiny_model_dir, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for bad in (afile, afile / "sub"):
        code, _, err = run(capsys, "profile", tiny_model_dir, "--context", 8, "--out", bad)
        assert code == 2 and str(bad) in err and "--out" in err and len(err.strip().splitlines()) == 1
    assert afile.read_text() == "keep me"


def test_cli_empty_prompt_file(capsys, tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    code, _, err = run(capsys, "profile", tiny_model_dir, "--prompt-file", empty, "--out", tmp_path / "o")
    assert code == 2 and "the prompt is empty" in err and str(empty) in err
