"""benchmarks/quality.py --replace-with: a later run's policies replace the first run's rows, nothing else."""

from __future__ import annotations

import pytest

from tests.bench import load_benchmark

q = load_benchmark("quality")
CASES = [{"case_id": "a", "key": "11111", "target_length": 2048}, {"case_id": "b", "key": "22222",
                                                                    "target_length": 2048}]


def _row(policy, fraction, case, found, kv=None):
    return {"tool": "kvscope", "policy": policy, "mode": "one-chunk", "kv_dtype": kv, "fraction": fraction,
            "case_id": case, "target_length": 2048, "found": found}


def _run(rows, commit, ppl=()):
    header = f"## t\n\n- device: CPU\n- date: 2026-12-01\n- commit: {commit}\n- command: `python q.py`\n\n"
    return {"cases": CASES, "passkey": rows, "ppl": list(ppl), "header": header, "checks": ["c1"]}


def test_later_rows_replace_only_their_policies():
    first = _run([_row("full", 1.0, c, True) for c in "ab"] + [_row("full", 1.0, c, False, "int4") for c in "ab"]
                 + [_row("lru", 0.25, c, False) for c in "ab"] + [_row("snapkv", 0.25, c, True) for c in "ab"],
                 "aaa1111", ppl=[{"tool": "kvscope", "policy": "lru", "measure": "stream", "fraction": 0.25,
                                  "nll_sum": 10.0, "tokens": 5}])
    later = _run([_row("full", 1.0, c, True) for c in "ab"] + [_row("lru", 0.25, c, True) for c in "ab"], "bbb2222",
                 ppl=[{"tool": "kvscope", "policy": "lru", "measure": "stream", "fraction": 0.25, "nll_sum": 5.0,
                       "tokens": 5}])
    out = q.replaced(first, later, [2048])
    by = {(g["policy"], g["kv_dtype"], g["fraction"]): g for g in out["summary"]}
    assert by[("lru", None, 0.25)]["acc_2048"] == 1.0  # replaced
    assert by[("snapkv", None, 0.25)]["acc_2048"] == 1.0  # kept
    assert by[("full", "int4", 1.0)]["acc_2048"] == 0.0  # a KV-dtype row is not the plain policy's row: kept
    assert by[("lru", None, 0.25)]["ppl_stream"] == pytest.approx(2.718, abs=1e-3)
    assert len(out["passkey"]) == 8 and len(out["ppl"]) == 1
    assert "rows of full, lru replaced by a later run: 2026-12-01, commit bbb2222" in out["header"]
    assert out["header"].startswith(first["header"].rstrip())


def test_runs_on_other_cases_are_refused():
    first = _run([_row("full", 1.0, "a", True)], "a")
    later = _run([_row("full", 1.0, "a", True)], "b")
    later["cases"] = [dict(CASES[0], key="99999"), CASES[1]]
    with pytest.raises(SystemExit, match="different cases"):
        q.replaced(first, later, [2048])


def test_bad_policies_and_doors_are_usage_errors(capsys):
    assert q.main(["--policies", "snapkv[windw=3]", "--no-kvpress", "--no-docs"]) == 2
    assert "--policies: policy 'snapkv' has no knob windw; expected one of kernel, window" in capsys.readouterr().err
    assert q.main(["--policies", "belady", "--no-kvpress", "--no-docs"]) == 2
    assert "unknown policy 'belady'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        q.main(["--doors", "9"])
    assert exc.value.code == 2 and "--doors must be 1 (one pass key) to 8" in capsys.readouterr().err
