"""The recall section's perplexity rows: one row per policy and budget, each text's change, the mean, the verdict."""

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
