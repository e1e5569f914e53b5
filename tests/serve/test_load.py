"""Load on the embedded SmolLM2 on the CPU: 32 concurrent sessions x 5 turns through the real server. Every request
is answered or refused with a Retry-After (and then retried); none is lost or mixed up: each reply equals the reply
that the same conversation gets alone from a fresh engine. The KV held stays within the global budget throughout
(sampled from /metrics while the load runs). Request loops are bounded in count and in time."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from kvscope.chat import ChatEngine
from tests.serve.helpers import scrape, serving, value

pytestmark = pytest.mark.slow
SESSIONS, TURNS, NEW_TOKENS = 32, 5, 2
SYSTEM = {"role": "system", "content": "Bike shop support."}
DEADLINE_S = 600
MAX_ATTEMPTS = 2000
SESSION_BUDGET, CHUNK, RESIDENT = 160, 128, 12  # the budget holds 12 of the 32 sessions: the others are dropped


def question(session: int, turn: int) -> str:
    return f"Customer {session}: where is order {1000 + 37 * session + turn}?"


class Sampler(threading.Thread):
    """Reads /metrics every 200 ms until stopped; keeps every (used, budget) pair of tokens and bytes."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.samples, self.halt = url, [], threading.Event()

    def run(self):
        while not self.halt.is_set():
            m = scrape(self.url)
            self.samples.append(tuple(value(m, n) for n in ("kvscope:kv_used_tokens", "kvscope:kv_budget_tokens",
                                                           "kvscope:kv_used_bytes", "kvscope:kv_budget_bytes",
                                                           "kvscope:num_requests_waiting")))
            self.halt.wait(0.2)


def converse(client, i: int, stop_at: float) -> dict:
    rng = random.Random(i)
    messages, replies, refusals = [SYSTEM], [], []
    for turn in range(TURNS):
        messages = messages + [{"role": "user", "content": question(i, turn)}]
        for _ in range(MAX_ATTEMPTS):
            assert time.monotonic() < stop_at, f"session {i} ran out of time at turn {turn}"
            try:
                r = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=NEW_TOKENS,
                                                   temperature=0, extra_headers={"X-Session-Id": f"c{i}"})
                break
            except (openai.RateLimitError, openai.InternalServerError) as exc:
                retry = exc.response.headers.get("retry-after")
                refusals.append((exc.status_code, retry))
                time.sleep(min(float(retry), 2.0) * rng.uniform(0.25, 1.0))  # at most 2 s: bounded test time
        else:
            raise AssertionError(f"session {i} turn {turn}: refused {MAX_ATTEMPTS} times")
        assert r.model_extra["kvscope"]["session_id"] == f"c{i}"
        replies.append((r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens))
        messages = messages + [{"role": "assistant", "content": r.choices[0].message.content}]
    return {"messages": messages, "replies": replies, "refusals": refusals}


def test_32_sessions_5_turns_answered_unmixed_within_the_kv_budget(smollm):
    model, tokenizer, _ = smollm
    budget = RESIDENT * (SESSION_BUDGET + CHUNK)
    start = time.monotonic()
    with serving(model, tokenizer, name="smollm2-135m", session_budget=SESSION_BUDGET, chunk_size=CHUNK,
                 budget_tokens=budget, max_waiting=6) as (srv, engine, client):
        sampler = Sampler(srv.url)
        sampler.start()
        stop_at = time.monotonic() + DEADLINE_S
        try:
            with ThreadPoolExecutor(SESSIONS) as pool:
                results = list(pool.map(lambda i: converse(client, i, stop_at), range(SESSIONS)))
        finally:
            sampler.halt.set()
            sampler.join()
        m = scrape(srv.url)
    served = time.monotonic() - start
    refusals = [r for res in results for r in res["refusals"]]
    assert all(status in (429, 503) and int(retry) >= 1 for status, retry in refusals)
    assert value(m, "kvscope:requests_total", outcome="ok") == SESSIONS * TURNS
    assert value(m, "kvscope:requests_total", outcome="refused") == len(refusals)
    assert value(m, "kvscope:requests_total", outcome="error") == 0
    assert value(m, "kvscope:requests_total", outcome="cancelled") == 0
    assert len(sampler.samples) > 10
    assert all(used <= cap and used_b <= cap_b for used, cap, used_b, cap_b, _ in sampler.samples)
    assert max(s[0] for s in sampler.samples) > budget / 2  # the budget was actually under pressure
    assert value(m, "kvscope:session_drops_total") > 0 and value(m, "kvscope:prompt_tokens_cached_total") > 0
    # each reply is the one its own conversation gets alone, from a fresh engine with room for every session
    alone = ChatEngine(model, tokenizer, session_budget=SESSION_BUDGET, chunk_size=CHUNK,
                       budget_tokens=SESSIONS * (SESSION_BUDGET + CHUNK))
    for i, res in enumerate(results):
        session, messages = alone.open(), res["messages"]
        for turn, (text, _) in enumerate(res["replies"]):
            upto = messages[:2 + 2 * turn]
            assert alone.chat(session, upto, max_new_tokens=NEW_TOKENS).text == text, f"session {i} turn {turn}"
    print(f"\nload: {SESSIONS * TURNS} answered in {served:.0f} s, {len(refusals)} refusals "
          f"({sum(s == 429 for s, _ in refusals)} x 429, {sum(s == 503 for s, _ in refusals)} x 503), "
          f"{int(value(m, 'kvscope:session_drops_total'))} drops, peak KV {max(s[0] for s in sampler.samples):.0f} "
          f"of {budget} tokens, {len(sampler.samples)} samples, cached prompt tokens "
          f"{value(m, 'kvscope:prompt_tokens_cached_total'):.0f}, computed "
          f"{value(m, 'kvscope:prompt_tokens_computed_total'):.0f}")
