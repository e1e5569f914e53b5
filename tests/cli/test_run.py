import json

import pytest

from tests.cli.test_cli import run


@pytest.mark.parametrize("argv, fragment", [
    (["--prompt", "hi", "--policy", "belady"], "unknown policy 'belady'; expected one of full, h2o"),
    (["--prompt", "hi", "--policy", "streaming_llm", "--budget", "3"],
     "budget of 3 tokens is below the minimum of policy 'streaming_llm'; expected at least 5 tokens"),
    (["--prompt", "hi", "--budget", "0"], "--budget must be a positive number, got 0"),
    (["--prompt", "hi", "--budget", "-4"], "--budget must be a positive number"),
    (["--prompt", "   "], "the prompt is empty"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "prompt file not found: /nonexistent/prompt.txt"),
    (["--prompt", "hi", "--new-tokens", "0"], "--new-tokens must be a positive number"),
    (["--prompt", "hi", "--kv-dtype", "int3"], "invalid choice: 'int3'"),
])
def test_run_bad_input_is_one_line_and_exit_2(capsys, argv, fragment):
    code, out, err = run(capsys, "run", "smollm2-135m", *argv)
    assert code == 2
    assert fragment in err
    assert "Traceback" not in err and out == ""


def test_run_unknown_model(capsys):
    code, _, err = run(capsys, "run", "no-such-model", "--prompt", "hi")
    assert code == 2 and "unknown model 'no-such-model'" in err


def test_run_random_weights_without_tokenizer_says_so(capsys):
    code, _, err = run(capsys, "run", "smollm2-135m", "--random-weights", "--prompt", "hi", "--device", "cpu")
    assert code == 2 and "has no tokenizer" in err and "--context N" in err


@pytest.mark.slow
def test_run_json_on_embedded_model(capsys):
    code, out, err = run(capsys, "run", "smollm2-135m", "--prompt", "What is the capital of France?",
                         "--policy", "streaming_llm", "--budget", "24", "--new-tokens", "12", "--format", "json",
                         "--device", "cpu")
    assert code == 0, err
    d = json.loads(out)
    assert {"text", "layers", "evicted_tokens_total", "prompt_tokens", "new_tokens"} <= set(d)
    assert len(d["layers"]) == 30 and all(row["stored_tokens"] <= 24 for row in d["layers"])
    assert d["evicted_tokens_total"] == 30 * (d["prompt_tokens"] + d["cached_new_tokens"] - 24)
    assert d["text"].strip()


@pytest.mark.slow
def test_run_table_without_budget_evicts_nothing(capsys, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Name three colours.")
    code, out, _ = run(capsys, "run", "smollm2-135m", "--prompt-file", str(f), "--new-tokens", "8",
                       "--device", "cpu")
    assert code == 0
    assert "KV cache per layer" in out and "nothing evicted" in out
