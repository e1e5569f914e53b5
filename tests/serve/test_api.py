"""The OpenAI-compatible API on a real server (127.0.0.1, a free port), driven by the official `openai` client:
completions streamed and not, multi-turn reuse visible in `usage` and in /metrics, sessions by header, by `user` and
by prefix, the metric names other tools read, and bad requests answered with the field, the limit or the model."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from tests.serve.helpers import scrape, serving, value

GAUGES = ["kvscope:kv_cache_usage_perc", "kvscope:kv_used_tokens", "kvscope:kv_budget_tokens", "kvscope:kv_used_bytes",
          "kvscope:kv_budget_bytes", "kvscope:num_requests_running", "kvscope:num_requests_waiting"]
COUNTERS = ["kvscope:prompt_tokens_cached_total", "kvscope:prompt_tokens_computed_total",
            "kvscope:evicted_tokens_total", "kvscope:session_drops_total", "kvscope:oom_events_total"]
ASK = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Where is my parcel?"}]


@pytest.fixture(scope="module")
def server(tiny_chat_model):
    with serving(*tiny_chat_model, budget_tokens=4 * 576) as running:
        yield running


def follow_up(messages, reply: str, question: str) -> list[dict]:
    return messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": question}]


def test_models_health_and_the_metric_names(server):
    srv, engine, client = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = json.loads(urllib.request.urlopen(srv.url + "/health").read())
    assert health == {"status": "ok", "model": "tiny"}
    m = scrape(srv.url)
    names = {k[0] for k in m}
    assert set(GAUGES + COUNTERS) <= names
    for state in ("active", "idle", "swapped"):
        assert ("kvscope:sessions", (("state", state),)) in m
    for direction in ("in", "out"):
        assert ("kvscope:session_swaps_total", (("direction", direction),)) in m
    for outcome in ("ok", "refused", "error", "cancelled"):
        assert ("kvscope:requests_total", (("outcome", outcome),)) in m
    assert {"kvscope:time_to_first_token_seconds_count", "kvscope:inter_token_latency_seconds_count"} <= names
    assert value(m, "kvscope:kv_budget_tokens") == 4 * 576 and value(m, "kvscope:kv_budget_bytes") == \
        4 * 576 * engine.store.slot_bytes


def test_multi_turn_by_session_header_reuses_kv_streamed_and_not(server):
    srv, engine, client = server
    before = scrape(srv.url)
    r1 = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=6, temperature=0,
                                        extra_headers={"X-Session-Id": "hdr"})
    assert r1.usage.prompt_tokens_details.cached_tokens == 0 and r1.usage.completion_tokens == 6
    assert r1.choices[0].finish_reason == "length" and r1.model_extra["kvscope"]["session_id"] == "hdr"
    messages = follow_up(ASK, r1.choices[0].message.content, "It was sent on Monday.")
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_headers={"X-Session-Id": "hdr"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens  # the whole first turn was reused
    after = scrape(srv.url)
    cached = value(after, "kvscope:prompt_tokens_cached_total") - value(before, "kvscope:prompt_tokens_cached_total")
    computed = value(after, "kvscope:prompt_tokens_computed_total") - \
        value(before, "kvscope:prompt_tokens_computed_total")
    assert cached == usage.prompt_tokens_details.cached_tokens
    assert computed == r1.usage.prompt_tokens + usage.prompt_tokens - cached
    assert value(after, "kvscope:requests_total", outcome="ok") - value(before, "kvscope:requests_total",
                                                                        outcome="ok") == 2
    # the same conversation, recomputed by a fresh session, gives the same streamed reply
    fresh = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                           extra_headers={"X-Session-Id": "fresh"})
    assert fresh.choices[0].message.content == text and fresh.usage.prompt_tokens_details.cached_tokens == 0


def test_user_field_and_prefix_matching_find_the_conversation(server):
    srv, engine, client = server
    r1 = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, user="alice")
    r2 = client.chat.completions.create(model="tiny", messages=follow_up(ASK, r1.choices[0].message.content, "Ok"),
                                        max_tokens=4, user="alice")
    assert r2.model_extra["kvscope"]["session_id"] == "alice" and r2.usage.prompt_tokens_details.cached_tokens > 0
    other = [ASK[0], {"role": "user", "content": "Do you sell gift cards?"}]
    a1 = client.chat.completions.create(model="tiny", messages=other, max_tokens=4)  # no key: a new session
    a2 = client.chat.completions.create(model="tiny", messages=follow_up(other, a1.choices[0].message.content, "Ok"),
                                        max_tokens=4)
    sid = a1.model_extra["kvscope"]["session_id"]
    assert a2.model_extra["kvscope"]["session_id"] == sid != "alice"  # found by its prefix
    assert a2.usage.prompt_tokens_details.cached_tokens >= a1.usage.prompt_tokens
    b1 = client.chat.completions.create(model="tiny", messages=[ASK[0], {"role": "user", "content": "Hi"}],
                                        max_tokens=4)  # shares only the system prompt: not that conversation
    assert b1.model_extra["kvscope"]["session_id"] not in (sid, "alice")
    info = json.loads(urllib.request.urlopen(f"{srv.url}/v1/sessions/{sid}").read())
    assert info["turns"] == 2 and info["keyed"] is False and info["state"] == "idle"


def test_sessions_can_be_listed_and_forgotten_and_unknown_ids_are_404(server):
    srv, engine, client = server
    client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2, user="bob")
    ids = [s["id"] for s in json.loads(urllib.request.urlopen(srv.url + "/v1/sessions").read())["data"]]
    assert "bob" in ids
    req = urllib.request.Request(f"{srv.url}/v1/sessions/bob", method="DELETE")
    assert json.loads(urllib.request.urlopen(req).read()) == {"id": "bob", "deleted": True}
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{srv.url}/v1/sessions/bob")
    body = json.loads(err.value.read())
    assert err.value.code == 404 and "no session 'bob'" in body["error"]["message"]


@pytest.mark.parametrize("kwargs, param, fragment", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "Input should be"),
    ({"messages": []}, "messages", "at least 1 item"),
    ({"messages": ASK, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"messages": ASK, "n": 2}, "n", "less than or equal to 1"),
    ({"messages": ASK + [{"role": "assistant", "content": "x"}]}, "messages", "last message must be from the user"),
    ({"messages": ASK, "extra_body": {"history": "forget"}}, "history", "'keep', 'truncate' or 'summarize'"),
])
def test_malformed_requests_get_422_naming_the_field(server, kwargs, param, fragment):
    _, engine, client = server
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="tiny", **kwargs)
    assert err.value.body["param"] == param and fragment in err.value.body["message"]


def test_unknown_model_404_names_the_served_one_and_too_long_400_names_the_limit(server):
    srv, engine, client = server
    with pytest.raises(openai.NotFoundError, match="this server serves 'tiny'"):
        client.chat.completions.create(model="llama-3-8b", messages=ASK)
    long = [{"role": "user", "content": "parcel " * 600}]
    with pytest.raises(openai.BadRequestError, match=r"its budget is 512 under policy 'full'.*at least \d+") as err:
        client.chat.completions.create(model="tiny", messages=long, max_tokens=8)
    assert err.value.body["code"] == "context_length_exceeded"
    m = scrape(srv.url)
    assert value(m, "kvscope:num_requests_running") == 0 and value(m, "kvscope:sessions", state="active") == 0
