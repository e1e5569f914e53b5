"""benchmarks/quality_merge.py: later runs replace earlier rows, runs on other cases are refused, verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench import load_benchmark

qm = load_benchmark("quality_merge")
HEADER = "## t\n\n- device: CPU\n- date: 2026-12-01\n- commit: abc1234\n- command: `python x.py`\n"


def _row(tool, policy, fraction, case, found, key="11111", mode=None):
    return {"tool": tool, "policy": policy, "mode": mode or ("one-chunk" if tool == "kvscope" else "together"),
            "kv_dtype": None, "fraction": fraction, "case_id": case, "key": key, "target_length": 2048,
            "found": found}


def _run(path: Path, rows) -> str:
    path.write_text(json.dumps({"header": HEADER, "args": {}, "passkey": rows}))
    return str(path)


def test_later_run_replaces_rows_and_verdicts(tmp_path):
    cases = ["a", "b"]
    first = _run(tmp_path / "1.json", [_row("kvscope", "full", 1.0, c, True) for c in cases]
                 + [_row("kvscope", "lru", 0.25, c, False) for c in cases]
                 + [_row("kvscope", "snapkv", 0.25, c, True) for c in cases]
                 + [_row("kvpress", "TOVAPress", 0.25, c, c == "a") for c in cases]
                 + [_row("kvpress", "KVzipPress", 0.05, c, True) for c in cases]
                 + [_row("kvscope", "snapkv", 0.05, c, c == "a") for c in cases]
                 + [_row("kvpress", "TOVAPress[window=9]", 0.25, c, True) for c in cases])  # an ablation: not compared
    second = _run(tmp_path / "2.json", [_row("kvscope", "lru", 0.25, c, True) for c in cases])
    docs = tmp_path / "bench.md"
    assert qm.main(["--section", "s", "--docs", str(docs), first, second]) == 0
    text = docs.read_text()
    assert "| kvscope lru |  | 2/2 |  |" in text  # the second run's rows replaced the first's
    assert "- 25%: kvscope lru/snapkv 2/2 beats the best kvpress press TOVAPress 1/2" in text
    assert "- 5%: kvscope snapkv 1/2 loses to the best kvpress press KVzipPress 2/2" in text
    assert "commit abc1234" in text and "<!-- section:s -->" in text
    assert "| kvpress TOVAPress[window=9] |  | 2/2 |  |" in text
    assert "`python -m benchmarks.quality_merge --section s --docs" in text  # the command, as it is run


def test_runs_on_other_cases_are_refused(tmp_path):
    first = _run(tmp_path / "1.json", [_row("kvscope", "full", 1.0, "a", True)])
    other_cases = _run(tmp_path / "2.json", [_row("kvscope", "full", 1.0, "z", True)])
    other_keys = _run(tmp_path / "3.json", [_row("kvscope", "full", 1.0, "a", True, key="22222")])
    for bad, words in ((other_cases, "differ"), (other_keys, "different cases")):
        with pytest.raises(SystemExit, match=words):
            qm.main(["--section", "s", "--docs", str(tmp_path / "bench.md"), first, bad])
    with pytest.raises(SystemExit, match="no passkey rows"):
        qm.main(["--section", "s", "--docs", str(tmp_path / "bench.md"), "--length", "4096", first])
    assert not (tmp_path / "bench.md").exists()
