"""`run` (and `profile`) check what they can before loading, clamp a budget larger than the sequence, refuse a cache
the device cannot hold, and respect the model's positions."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_cli import run


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model gets loaded: these errors must come before it."""
    import kvscope.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(kvscope.models, "load", refuse)


@pytest.mark.parametrize("argv, fragment", [
    (["--random-weights", "--prompt", "hi"], "drop --prompt and add --context N"),
    (["--device", "tpu", "--prompt", "hi"], "unknown device 'tpu'"),
    (["--device", "mps", "--prompt", "hi"], "unknown device 'mps'"),
    (["--context", "2000", "--new-tokens", "8"], "needs 2007 positions, but the model supports 1024"),
    (["--context", "8", "--budget", "8", "--policy", "snapkv"], "below the minimum of policy 'snapkv'"),
    (["--context", "8", "--policy-knob", "window=4"], "has no knob window"),
])
def test_refused_before_loading(capsys, tiny_model_dir, no_loading, argv, fragment):
    code, out, err = run(capsys, "run", str(tiny_model_dir), *argv)
    assert code == 2, err
    assert fragment in err and out == "" and "change pass" not in err and "change drop" not in err


def test_cuda_without_cuda_is_refused_before_loading(capsys, tiny_model_dir, no_loading):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks a machine without CUDA")
    code, _, err = run(capsys, "run", str(tiny_model_dir), "--device", "cuda", "--context", "8")
    assert code == 2 and "CUDA is not available" in err


def test_random_weights_take_context(capsys, tiny_model_dir):
    code, out, err = run(capsys, "run", str(tiny_model_dir), "--random-weights", "--context", "12", "--new-tokens",
                         "3", "--device", "cpu", "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    assert d["prompt_tokens"] == 12 and 1 <= d["new_tokens"] <= 3


def test_a_budget_beyond_the_sequence_is_clamped_and_said(capsys, tiny_model_dir):
    code, out, err = run(capsys, "run", str(tiny_model_dir), "--context", "10", "--new-tokens", "3", "--policy", "lru",
                         "--budget", "100000000", "--device", "cpu", "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    assert d["budget_tokens"] == 12  # 10 + 3 - 1: the cache never needs more
    assert "--budget 100000000 is more than the 12 KV tokens" in d["budget_note"]


def test_a_cache_larger_than_the_device_is_refused_before_allocating(capsys, tiny_model_dir, monkeypatch):
    from kvscope.runtime import session

    monkeypatch.setattr(session, "free_memory", lambda device: 1000)
    code, out, err = run(capsys, "run", str(tiny_model_dir), "--context", "10", "--new-tokens", "3", "--device", "cpu")
    assert code == 3 and "the KV cache would allocate" in err and "has 1000 B free" in err and out == ""


def test_the_full_policy_outgrowing_its_budget_is_exit_3(capsys, tiny_model_dir):
    code, _, err = run(capsys, "run", str(tiny_model_dir), "--context", "40", "--new-tokens", "2", "--policy", "full",
                       "--budget", "8", "--chunk-size", "8", "--device", "cpu")
    assert code == 3 and "does not fit" in err


@pytest.mark.slow
def test_a_prompt_beyond_the_positions_is_refused(capsys, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text(" ".join(["apple"] * 9000))  # about 9000 tokens; SmolLM2 has 8192 positions
    code, out, err = run(capsys, "run", "smollm2-135m", "--prompt-file", str(long), "--new-tokens", "2",
                         "--device", "cpu")
    assert code == 2 and "but the model supports 8192" in err and out == ""


def test_profile_interrupted_leaves_no_empty_out(capsys, tiny_model_dir, tmp_path, monkeypatch):
    from kvscope.cli import profile

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(profile, "_profile", interrupted)
    out = tmp_path / "prof"
    code, _, err = run(capsys, "profile", str(tiny_model_dir), "--context", "8", "--device", "cpu", "--out", str(out))
    assert code == 130 and not out.exists()


def test_profile_out_must_be_empty_unless_forced(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "prof"
    argv = ["profile", str(tiny_model_dir), "--context", "8", "--new-tokens", "2", "--device", "cpu", "--out", str(out)]
    assert run(capsys, *argv)[0] == 0
    code, _, err = run(capsys, *argv)
    assert code == 2 and "is not empty" in err
    assert run(capsys, *argv, "--force")[0] == 0
    traces = list((out / "tensorboard").rglob("*.pt.trace.json"))
    assert len(traces) == 1  # the forced run replaced the earlier one's trace: files of two runs never mix
