"""`kvscope run --tp N`: bad degrees fail before anything starts (exit 2, one line); on the CPU with the test switch,
two gloo ranks run the prompt and report per rank and in total."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_cli import run
from tests.conftest import TINY

ARGS = ["--random-weights", "--context", "24", "--new-tokens", "6", "--policy", "lru", "--budget", "12",
        "--device", "cpu", "--format", "json"]


@pytest.mark.parametrize("tp, gloo, fragment", [
    ("2", False, "tensor parallel over gloo on the CPU is for kvscope's own tests only"),
    ("3", True, "--tp 3 does not divide the 32 attention heads of llama-3.2-1b; expected one of 1, 2, 4, 8"),
    ("0", True, "--tp must be a positive number, got 0"),
    ("two", True, "invalid int value: 'two'"),
])
def test_bad_tp_is_one_line_and_exit_2(capsys, monkeypatch, tp, gloo, fragment):
    if gloo:
        monkeypatch.setenv("KVSCOPE_ALLOW_GLOO", "1")
    else:
        monkeypatch.delenv("KVSCOPE_ALLOW_GLOO", raising=False)
    code, out, err = run(capsys, "run", "llama-3.2-1b", *ARGS, "--tp", tp)
    assert code == 2 and fragment in err
    assert "Traceback" not in err and out == ""


def test_run_on_two_gloo_ranks_reports_each_rank_and_the_total(capsys, monkeypatch, tmp_path):
    from kvscope.cli import run as run_command

    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY))
    monkeypatch.setenv("KVSCOPE_ALLOW_GLOO", "1")
    code, out, err = run(capsys, "run", str(model), *ARGS, "--tp", "2")
    assert code == 0, err
    d = json.loads(out)
    code1, out1, _ = run(capsys, "run", str(model), *ARGS)
    single = json.loads(out1)
    assert code1 == 0 and d["text"] == single["text"]  # the same greedy tokens as one process
    tp = d["tensor_parallel"]
    assert tp["tp"] == 2 and tp["backend"] == "gloo" and tp["agree"]
    assert [r["kv_heads"] for r in tp["ranks"]] == [1, 1] and tp["total"]["kv_heads"] == TINY["num_key_value_heads"]
    assert tp["total"]["kv_bytes"] == sum(r["kv_bytes"] for r in tp["ranks"]) == single["kv_bytes_total"]
    assert all(r["evicted_tokens"] == single["evicted_tokens_total"] for r in tp["ranks"])
    run_command.render(d)  # the table form renders the per-rank table
    shown = capsys.readouterr().out
    assert "tensor parallel: 2 ranks (gloo)" in shown and "total" in shown
