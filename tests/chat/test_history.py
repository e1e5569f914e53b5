"""History strategies on a tiny random Llama with the embedded model's tokenizer and chat template."""

from __future__ import annotations

import pytest

from kvscope.chat import ChatEngine, History, TooLongError
from kvscope.chat.history import SUMMARY_PREFIX, split_turns
from kvscope.errors import UsageError

SYSTEM = {"role": "system", "content": "You help customers of a bicycle shop."}


def conversation(turns: int) -> list[dict]:
    out = [SYSTEM]
    for i in range(turns):
        out += [{"role": "user", "content": f"Question {i}: is the blue bike number {i} in stock today?"},
                {"role": "assistant", "content": f"Answer {i}: yes, bike {i} is in stock and ready for pickup."}]
    return out + [{"role": "user", "content": "Thanks. What did I ask first?"}]


def test_truncate_drops_the_oldest_whole_turns_never_the_system_prompt(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    engine = ChatEngine(model, tokenizer, session_budget=512, chunk_size=64, history="truncate", history_tokens=140)
    messages = conversation(6)
    count = engine.renderer.count
    kept, _ = engine.history.prepare(messages, 8, count, None, summarize=None)
    system, turns = split_turns(kept)
    assert system == [SYSTEM] and kept[-1] == messages[-1]
    assert kept[1:] == messages[len(messages) - len(kept) + 1:]  # a suffix of whole turns
    assert all(t[0]["role"] == "user" for t in turns)
    assert count(kept) + 8 <= 140 < count([SYSTEM] + messages[len(messages) - len(kept) - 1:])  # one more would not fit
    r = engine.chat(engine.open(), messages, max_new_tokens=8)
    assert r.prompt_tokens == count(kept)


def test_summarize_replaces_the_oldest_turns_once_and_reuses_the_summary_kv(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    engine = ChatEngine(model, tokenizer, session_budget=1024, chunk_size=64, history="summarize",
                        history_tokens=200, summary_tokens=8)
    session = engine.open()
    messages = conversation(6)
    r1 = engine.chat(session, messages, max_new_tokens=6)
    assert session.counters.summaries == 1 and session.summary is not None
    assert session.summary.covered == tuple((m["role"], m["content"]) for m in messages[1:len(session.summary.covered)
                                                                                          + 1])
    summary_at = engine.renderer.count([SYSTEM, session.summary.message()])
    messages = messages + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "And the second?"}]
    r2 = engine.chat(session, messages, max_new_tokens=6)
    assert session.counters.summaries == 1  # the same turns are summarized once: the summary is put in their place
    assert r2.reused_tokens >= summary_at  # and its KV (built in turn 1) is reused
    text = engine.renderer.decode(session.ids, special=True)
    assert SUMMARY_PREFIX in text and "Question 0" not in text


def test_summarize_is_not_applied_to_an_edited_history(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    history = History("summarize", 200)
    made = []

    def summarize(covered):
        made.append(covered)
        return f"summary {len(made)}"

    count = ChatEngine(model, tokenizer, session_budget=256, chunk_size=64).renderer.count
    _, summary = history.prepare(conversation(6), 8, count, None, summarize)
    edited = conversation(6)
    edited[1] = {"role": "user", "content": "A different first question about red bikes?"}
    prepared, again = history.prepare(edited, 8, count, summary, summarize)
    assert len(made) == 2 and again.text == "summary 2" and prepared[1]["content"].endswith("summary 2")


def test_bad_strategies_and_a_last_turn_that_cannot_fit(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    with pytest.raises(UsageError, match=r"unknown history strategy 'forget'; expected one of keep, truncate, "
                                         "summarize; change history"):  # the library names the parameter
        ChatEngine(model, tokenizer, history="forget")
    with pytest.raises(UsageError, match="history limit must be a whole number"):
        History("truncate", 0)
    engine = ChatEngine(model, tokenizer, session_budget=512, chunk_size=64, history="truncate", history_tokens=40)
    session = engine.open()
    with pytest.raises(TooLongError, match=r"the last turn alone needs \d+ prompt tokens \+ 8 new tokens .* history "
                                           "limit of 40 tokens"):
        engine.chat(session, [SYSTEM, {"role": "user", "content": "word " * 60}], max_new_tokens=8)
    assert session.state == "new" and engine.store.used().tokens == 0
