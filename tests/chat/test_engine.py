"""ChatEngine on the embedded SmolLM2: a session's reply is token-for-token the reply of recomputing the whole
history under `full`, while only the new turn is prefilled; an edited history is recomputed from its first
difference."""

from __future__ import annotations

import pytest
import torch

from kvscope.chat import ChatEngine
from kvscope.chat.session import common_prefix

pytestmark = pytest.mark.slow
SYSTEM = {"role": "system", "content": "You are a support agent for an online shop. Answer in one sentence."}
QUESTIONS = ["My order 4411 has not arrived.", "It was sent ten days ago.", "Can I get a refund?"]


def recompute(model, tokenizer, messages, new_tokens):
    """Plain transformers: the whole history through model.generate(), greedy, stopped at the end-of-turn token."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    reply = out[0, ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    return reply[:reply.index(eos)] if eos in reply else reply


def test_turns_reuse_the_cache_and_match_recomputing(smollm):
    model, tokenizer, _ = smollm
    engine = ChatEngine(model, tokenizer, policy="full", session_budget=512, chunk_size=64)
    session = engine.open("support")
    messages, held = [SYSTEM], 0
    for i, question in enumerate(QUESTIONS):
        messages = messages + [{"role": "user", "content": question}]
        r = engine.chat(session, messages, max_new_tokens=8)
        assert r.ids == recompute(model, tokenizer, messages, 8), f"turn {i + 1}"
        assert r.reused_tokens == held  # everything the cache held was a prefix of this turn's prompt
        assert r.computed_tokens == r.prompt_tokens - held and r.restore == ("new" if i == 0 else "resident")
        held = len(session.ids)
        assert held == r.prompt_tokens + r.completion_tokens + (r.finish_reason == "stop") - (
            r.finish_reason == "length")  # the stop token is fed; the last token of a full-length reply is not
        messages = messages + [{"role": "assistant", "content": r.text}]
    c = session.counters
    assert c.turns == 3 and c.reused_tokens > 0 and c.rewinds == 0


def test_an_edited_history_is_recomputed_from_its_first_difference(smollm):
    model, tokenizer, _ = smollm
    engine = ChatEngine(model, tokenizer, policy="full", session_budget=512, chunk_size=64)
    session = engine.open()
    first = [SYSTEM, {"role": "user", "content": QUESTIONS[0]}]
    r1 = engine.chat(session, first, max_new_tokens=8)
    follow = first + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": QUESTIONS[1]}]
    engine.chat(session, follow, max_new_tokens=8)
    edited = [SYSTEM, {"role": "user", "content": "My order 4412 has not arrived."}] + follow[2:]
    r3 = engine.chat(session, edited, max_new_tokens=8)
    before, after = (engine.renderer.encode(engine.renderer.text(m)) for m in (follow, edited))
    assert r3.reused_tokens == common_prefix(before, after) < r1.prompt_tokens  # up to the edited digit only
    assert session.counters.rewinds == 1
    assert r3.ids == recompute(model, tokenizer, edited, 8)
