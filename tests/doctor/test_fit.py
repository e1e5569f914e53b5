"""fit says when it reached the top of its search, and refuses searches whose answer cannot exist."""

from __future__ import annotations

import json

from tests.doctor.test_report_figures import run


def test_a_search_ceiling_reached_is_said_as_such(capsys, tiny_model_dir):
    # the tiny model has 1024 positions: a 2000-token budget holds any prompt it can take (1024 - 4 + 1 = 1021)
    code, out, err = run(capsys, "fit", tiny_model_dir, "--device", "cpu", "--dimension", "context", "--runtime",
                         "kvscope", "--budget", "2000", "--new-tokens", "4", "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    assert d["measured"] == d["ceiling"] == 1021 and d["ceiling_reached"] and d["error"] is None
    code, out, _ = run(capsys, "fit", tiny_model_dir, "--device", "cpu", "--dimension", "context", "--runtime",
                       "kvscope", "--budget", "2000", "--new-tokens", "4")
    assert "at least 1021 (the top of the search" in out and "+" not in out.split("prediction error")[1].split("\n")[0]


def test_batch_on_the_cpu_has_no_answer(capsys, tiny_model_dir):
    code, out, err = run(capsys, "fit", tiny_model_dir, "--device", "cpu", "--dimension", "batch", "--context", "64",
                         "--new-tokens", "2", "--runtime", "kvscope", "--policy", "full", "--budget", "256")
    assert code == 2 and "every batch size fits it" in err and "--dimension context" in err and out == ""


def test_a_prediction_that_cannot_exist_is_an_error(capsys, tiny_model_dir):
    code, out, err = run(capsys, "fit", tiny_model_dir, "--device", "cpu", "--dimension", "context", "--runtime",
                         "kvscope", "--policy", "full", "--budget", "64", "--new-tokens", "100")
    assert code == 2 and "cannot hold 100 new tokens" in err and "--budget or --new-tokens" in err and out == ""
