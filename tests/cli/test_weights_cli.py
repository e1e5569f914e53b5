"""`--weights` on the commands: planned bytes, fix commands that run as printed, and bad input (exit code 2, one line
naming the option, no traceback)."""

from __future__ import annotations

import json
import shlex

import pytest

from kvscope.cli.main import build_parser, main
from kvscope.models.spec import ModelSpec


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_with_weights(capsys):
    code, out, err = run(capsys, "plan", "llama-3.1-8b", "--weights", "int4", "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    assert d["weights_bytes"] == ModelSpec.from_catalogue("llama-3.1-8b").weights_bytes("bf16", weights="int4")
    assert d["workload"]["weights"] == "int4"


def test_plan_fix_commands_with_weights_run_as_printed(capsys):
    code, out, err = run(capsys, "plan", "llama-3.1-8b", "--context", "8000", "--new-tokens", "16", "--runtime",
                         "kvscope", "--gpu-memory", "16GiB", "--format", "json")
    assert code == 0, err
    fixes = [f for f in json.loads(out)["advice"] if f["option"].startswith("--weights")]
    # the order follows measured decode speed where there is one (tests/planner/test_weights.py)
    assert sorted(f["option"] for f in fixes) == ["--weights fp8", "--weights int4", "--weights int8"]
    for f in fixes:
        assert "not KV" in f["tradeoff"]
        words = shlex.split(f["command"])
        assert words[:2] == ["kvscope", "plan"] and f["option"] in f["command"]
        build_parser().parse_args(words[1:])
        code, again, _ = run(capsys, *words[1:], "--format", "json")
        assert code == 0 and json.loads(again)["fits"] is True


@pytest.mark.parametrize("argv", [
    ["plan", "llama-3.1-8b", "--weights", "int5"],
    ["run", "smollm2-135m", "--random-weights", "--context", "8", "--weights", "q4"],
])
def test_unknown_format_is_a_usage_error(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exit for an invalid choice
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert "--weights" in err and "int8" in err and "Traceback" not in err


def test_int4_on_the_cpu_fails_before_loading(capsys):
    code, _, err = run(capsys, "run", "llama-3.1-8b", "--random-weights", "--context", "8", "--new-tokens", "2",
                       "--device", "cpu", "--weights", "int4")
    assert code == 2
    assert "CUDA GPU of compute capability 8.0" in err and "--device cuda" in err and "Traceback" not in err


def test_int4_on_a_model_it_cannot_group(capsys):
    code, _, err = run(capsys, "plan", "smollm2-135m", "--weights", "int4")
    assert code == 2 and "576" in err and "--weights int8" in err


def test_doctor_refuses_int4_on_the_cpu_before_loading(capsys, tmp_path):
    code, _, err = run(capsys, "doctor", "llama-3.2-1b", "--random-weights", "--device", "cpu", "--batch", "1",
                       "--context", "8", "--new-tokens", "2", "--weights", "int4", "--out", str(tmp_path / "r"))
    assert code == 2 and "needs a CUDA GPU" in err


def test_weights_with_tensor_parallel(capsys):
    code, _, err = run(capsys, "plan", "llama-3.1-70b", "--tp", "2", "--weights", "int8")
    assert code == 2 and "--tp" in err and "--weights" in err


def test_torchao_missing_on_the_command_line(capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao", None)
    code, _, err = run(capsys, "run", "smollm2-135m", "--random-weights", "--context", "8", "--new-tokens", "2",
                       "--device", "cpu", "--weights", "int8")
    assert code == 2 and "pip install 'torchao>=0.18'" in err and "Traceback" not in err
