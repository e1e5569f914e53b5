"""The recall section's perplexity rows (one row per policy and budget, each text's change, the mean, the verdict),
and which rows of a resumed run are measured again."""

from benchmarks.recall_render import ppl_rows, ppl_table, ppl_verdict


def _row(text, recall, ppl, policy="lru", fraction=0.125):
    return {"text": text, "policy": policy, "fraction": fraction, "recall": recall, "ppl": ppl}


def test_mean_and_worse_texts():
    data = {"perplexity": [_row("story", None, 25.0), _row("story", "cpu", 25.5),
                           _row("h1", None, 30.0), _row("h1", "cpu", 28.0)]}
    (row,) = ppl_rows(data)
    assert row["mean"] == (27.5, 26.75)
    assert row["worse"] == ["story"]
    assert "mean no worse: met" in ppl_verdict(data) and "story (+2.00%)" in ppl_verdict(data)
    assert "25.000 → 25.500 (+2.00%)" in ppl_table(data)


def test_worse_mean_is_missed_and_rows_without_text_are_the_story():
    data = {"perplexity": [{"policy": "snapkv", "fraction": 0.25, "recall": None, "ppl": 24.0},
                           {"policy": "snapkv", "fraction": 0.25, "recall": "cpu", "ppl": 24.1}]}
    assert "worse: MISSED" in ppl_verdict(data)
    assert list(ppl_rows(data)[0]["texts"]) == ["story"]


def test_a_text_without_both_runs_is_left_out():
    assert ppl_rows({"perplexity": [_row("story", None, 25.0)]}) == []


def _case(policy, mode, fraction, found, case_id="L2048-d05-r0"):
    return {"policy": policy, "mode": mode, "fraction": fraction, "case_id": case_id, "length": 2045, "found": found,
            "seconds": 1.0}


def test_a_further_run_has_its_own_table_and_verdict_below_the_main_one():
    from benchmarks.recall_render import render

    meta = {"device": "CPU", "date": "2026-12-03", "commit": "abc1234", "command": "python -m benchmarks.recall"}
    main = {"meta": meta, "chunk": 512, "passkey": [_case("lru", "chunked", 0.125, False),
                                                    _case("lru", "recall", 0.125, True)]}
    low = {"meta": {**meta, "commit": "def5678"}, "chunk": 512, "note": "low budgets",
           "passkey": [_case("lru", "chunked", 0.025, False), _case("lru", "recall", 0.025, True)]}
    text = render(main, [], more={"recall.low.json": low})
    assert text.index("| 2048 | 12.5% | lru |") < text.index("`docs/data/recall.low.json`") < text.index(
        "| 2048 | 2.5% | lru |")
    assert "commit def5678" in text and "(low budgets)" in text
    assert "lru 2048 at 2.5%: recall 1/1" in text
    assert "best press not run (above it: not run)" in text  # no kvpress rows were given


def test_a_resumed_run_drops_only_the_rows_it_measures_again():
    from benchmarks.recall import kept_rows, parse_args

    a = parse_args(["--resume", "--rerun", "recall", "--policies", "snapkv", "--budgets", "0.25"])
    rows = [{"mode": m, "policy": p, "fraction": f, "case_id": c}
            for m in ("recall", "chunked") for p in ("snapkv", "lru") for f in (0.125, 0.25) for c in ("A", "B")]
    kept = kept_rows(rows, a, {"A"})
    dropped = [r for r in rows if r not in kept]
    assert dropped == [{"mode": "recall", "policy": "snapkv", "fraction": 0.25, "case_id": "A"}]
    assert kept_rows(rows, parse_args(["--resume"]), {"A", "B"}) == rows  # no --rerun: every row stays
