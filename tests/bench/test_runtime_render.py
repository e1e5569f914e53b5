"""The runtime recall section from its rows: the table, and the prefill ratio of the medians."""

from benchmarks.runtime_render import GIB, _recall


def _row(round_, recall, seconds):
    return {"round": round_, "recall": recall, "prefill_s": seconds, "peak_over_base": GIB // 2,
            "arena_bytes": GIB // 4, "kv_store_bytes": GIB // 8, "recalled": 0 if recall is None else 100}


def test_ratio_of_the_medians_and_the_rows():
    d = {"context": 32768, "chunk": 512, "policy": "snapkv", "budget": 2048,
         "rows": [_row(0, None, 2.0), _row(0, "cpu", 2.4), _row(1, None, 2.0), _row(1, "cpu", 2.8)]}
    text = _recall(d)
    assert "**1.30x**" in text
    assert "| 0 | cpu | 2.4 | 1.20x | 0.500 | 0.250 | 0.125 | 100 |" in text  # each round's own ratio
    assert "| 1 | cpu | 2.8 | 1.40x |" in text and "| 1 | none | 2.0 |  |" in text


def test_further_runs_follow_with_their_own_ratio():
    d = {"context": 32768, "chunk": 512, "policy": "snapkv", "budget": 2048,
         "rows": [_row(0, None, 2.0), _row(0, "cpu", 2.2)]}
    older = {"meta": {"commit": "abc1234", "date": "2026-12-01", "command": "python -m benchmarks.runtime"},
             "note": "before the change", "rows": [_row(0, None, 2.0), _row(0, "cpu", 3.0)]}
    text = _recall(d, {"runtime-recall.abc1234.json": older})
    assert text.index("**1.10x**") < text.index("runtime-recall.abc1234.json") < text.index("**1.50x**")
    assert "(before the change)" in text


def test_a_run_cut_short_has_no_ratio():
    d = {"context": 32768, "chunk": 512, "policy": "snapkv", "budget": 2048, "rows": [_row(0, None, 2.0)]}
    assert "x** (target" not in _recall(d)


def test_a_note_on_how_the_rows_were_kept_is_shown():
    d = {"context": 32768, "chunk": 512, "policy": "snapkv", "budget": 2048, "rows": [_row(0, None, 2.0)],
         "note": "rows read back from the log"}
    assert "Note: rows read back from the log." in _recall(d)
