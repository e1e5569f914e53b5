"""Rendering keeps the ids a session holds; streamed text never shows half a character or part of a stop string."""

from __future__ import annotations

from kvscope.chat.prompt import Renderer, TextStream


def test_ids_the_session_holds_are_kept_when_the_text_continues_them(tiny_chat_model):
    _, tokenizer = tiny_chat_model
    r = Renderer(tokenizer)
    first = [{"role": "user", "content": "Hello there"}]
    prompt = r.ids(first, [])
    odd_reply = r.encode(" Hi") + r.encode("!")  # generated ids a fresh tokenization would not produce
    held = prompt + odd_reply + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    follow = first + [{"role": "assistant", "content": " Hi!"}, {"role": "user", "content": "Bye"}]
    again = r.ids(follow, held)
    assert again[:len(held)] == held and r.decode(again, special=True) == r.text(follow)
    assert r.ids(follow, [1, 2, 3]) == r.encode(r.text(follow))  # not a prefix: tokenized afresh


def test_text_stream_holds_back_stop_strings_and_partial_characters(tiny_chat_model):
    _, tokenizer = tiny_chat_model
    r = Renderer(tokenizer)
    ids = r.encode("Total: 12 € END more")
    stream = TextStream(r, ["END"])
    pieces = [stream.push(t) for t in ids]
    assert all("\ufffd" not in p and "EN" not in p for p in pieces)
    assert "".join(pieces) + stream.finish() == "Total: 12 € "
