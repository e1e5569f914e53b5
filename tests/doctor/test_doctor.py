"""The doctor and fit on the CPU: a KV budget overflow is diagnosed, fixed and reported; bad input is refused."""

from __future__ import annotations

import json

import pytest

from kvscope.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_doctor_diagnoses_budget_overflow_and_applies_the_fix(capsys, tiny_model_dir, tmp_path):
    out_dir = tmp_path / "report"
    code, out, err = run(capsys, "doctor", str(tiny_model_dir), "--device", "cpu", "--batch", "2", "--context", "60",
                         "--new-tokens", "6", "--runtime", "kvscope", "--policy", "full", "--budget", "24",
                         "--chunk-size", "16", "--fix", "--out", str(out_dir), "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    assert d["outcome"]["detail"] == "kv_budget_exceeded"
    assert "needs 65 KV tokens per layer, the budget holds 24" in d["diagnosis"]["headline"]
    assert [f["option"].split()[0] for f in d["fixes"]][-2:] == ["--policy", "--budget"]
    fo = d["fix_outcome"]
    assert fo["status"] == "ok"
    assert any("no CUDA device" in n for n in d["notes"])
    saved = json.loads((out_dir / "report.json").read_text())
    assert saved["diagnosis"] == d["diagnosis"]
    html = (out_dir / "report.html").read_text()
    assert "plot-timeline" in html and "KV budget exceeded" in html


def test_doctor_with_eviction_fix_records_evictions(capsys, tiny_model_dir, tmp_path):
    # int8/int4 cannot hold 200 tokens in the bytes of 16 fp32 ones, so the best fix is eviction
    code, out, err = run(capsys, "doctor", str(tiny_model_dir), "--device", "cpu", "--batch", "1", "--context", "200",
                         "--new-tokens", "4", "--runtime", "kvscope", "--budget", "16", "--chunk-size", "32", "--fix",
                         "--out", str(tmp_path / "r"), "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    assert d["fix_outcome"]["applied"].startswith("evict with lru")  # snapkv's 32-token window does not fit 16
    assert d["fix_outcome"]["evicted_tokens"] > 0
    assert all(row["stored_tokens"] <= 16 for row in d["kv_layers"])
    assert d["evictions"]["evicted_tokens"][-1] > 0


def test_doctor_fix_with_nothing_to_fix_says_so(capsys, tiny_model_dir, tmp_path):
    code, out, _ = run(capsys, "doctor", str(tiny_model_dir), "--device", "cpu", "--batch", "1", "--context", "20",
                       "--new-tokens", "2", "--fix", "--out", str(tmp_path / "ok"), "--format", "json")
    assert code == 0
    d = json.loads(out)
    assert d["outcome"]["status"] == "ok" and d["fix_outcome"] is None
    assert any("nothing to fix" in n for n in d["notes"])


@pytest.mark.parametrize("extra, fragment", [
    (["--out", "/proc/version"], "--out"),
    (["--gpu-memory", "lots"], "malformed size 'lots'"),
    (["--budget", "0", "--runtime", "kvscope"], "--budget must be a positive number"),
    (["--policy", "nope", "--runtime", "kvscope"], "unknown policy 'nope'"),
    (["--kv-dtype", "int8"], "plain transformers generate() keeps its KV cache in the model dtype"),
    (["--budget", "8"], "--budget configures kvscope's cache, but --runtime is hf"),
    (["--policy", "lru"], "--policy configures kvscope's cache, but --runtime is hf"),  # was dropped silently
    (["--chunk-size", "64"], "--chunk-size configures kvscope's cache"),
    (["--gpu-memory", "80"], "size '80' has no unit"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "mps"], "unknown device 'mps'"),
    (["--runtime", "kvscope", "--policy", "snapkv", "--policy-knob", "kernel=6"], "kernel must be odd"),
    (["--runtime", "kvscope", "--policy", "snapkv", "--policy-knob", "windw=6"], "has no knob windw"),
    (["--runtime", "kvscope", "--policy-knob", "oops"], "expected NAME=VALUE"),
])
def test_doctor_bad_input(capsys, tiny_model_dir, tmp_path, extra, fragment):
    argv = ["doctor", str(tiny_model_dir), "--device", "cpu", "--batch", "1", "--context", "20", "--new-tokens", "2",
            "--out", str(tmp_path / "x"), *extra]
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    assert fragment in err and "Traceback" not in err


def test_doctor_context_beyond_positions(capsys, tiny_model_dir, tmp_path):
    code, _, err = run(capsys, "doctor", str(tiny_model_dir), "--device", "cpu", "--batch", "1", "--context", "5000",
                       "--new-tokens", "2", "--out", str(tmp_path / "x"))
    assert code == 2 and "1024" in err


def test_fit_finds_largest_context_for_a_budget(capsys, tiny_model_dir):
    code, out, err = run(capsys, "fit", str(tiny_model_dir), "--device", "cpu", "--dimension", "context",
                         "--runtime", "kvscope", "--budget", "40", "--new-tokens", "4", "--context", "8",
                         "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    assert d["measured"] == 37 and d["predicted"] == 37 and d["runs"] == 2


def test_fit_on_cpu_without_budget_is_refused(capsys, tiny_model_dir):
    code, _, err = run(capsys, "fit", str(tiny_model_dir), "--device", "cpu", "--context", "8")
    assert code == 2 and "only a KV budget can run out" in err
