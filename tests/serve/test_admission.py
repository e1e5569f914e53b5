"""Admission control: over capacity a request is refused with 429 (queue full, or its session busy) or 503 (the KV
budget is held by busy sessions, or the server is draining), always with Retry-After; admitted requests all finish."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.serve.helpers import scrape, serving, value


def ask(client, key: str, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"hello from {key}"}],
                                          max_tokens=4, user=key, **kw)


def wait_for(srv, name: str, want: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while value(scrape(srv.url), name) != want:
        assert time.monotonic() < deadline, f"{name} never reached {want}"
        time.sleep(0.05)


@pytest.mark.parametrize("budget_sessions, max_waiting, status", [(3, 2, 429), (2, 4, 503)])
def test_over_capacity_is_refused_with_retry_after_and_nothing_admitted_is_lost(tiny_chat_model, budget_sessions,
                                                                                max_waiting, status):
    with serving(*tiny_chat_model, budget_tokens=budget_sessions * 576, max_waiting=max_waiting) as (srv, engine,
                                                                                                     client):
        engine.lock.acquire()  # the worker stalls at its next turn: requests pile up behind it
        pool = ThreadPoolExecutor(4)
        try:
            admitted = [pool.submit(ask, client, "s0")]
            wait_for(srv, "kvscope:num_requests_running", 1)
            n = min(max_waiting, budget_sessions - 1)
            admitted += [pool.submit(ask, client, f"s{i}") for i in range(1, n + 1)]
            wait_for(srv, "kvscope:num_requests_waiting", n)
            error = openai.RateLimitError if status == 429 else openai.InternalServerError
            with pytest.raises(error) as err:
                ask(client, "late")
            assert err.value.status_code == status and int(err.value.response.headers["retry-after"]) >= 1
            busy = "one turn at a time" if status == 503 else "requests are waiting already"
            with pytest.raises(openai.RateLimitError, match=busy):
                ask(client, "s1")  # s1 has a request waiting already (where the queue has room)
        finally:
            engine.lock.release()
        replies = [f.result(timeout=60) for f in admitted]
        assert [r.model_extra["kvscope"]["session_id"] for r in replies] == [f"s{i}" for i in range(len(replies))]
        m = scrape(srv.url)
        assert value(m, "kvscope:requests_total", outcome="ok") == len(replies)
        assert value(m, "kvscope:requests_total", outcome="refused") == 2
        assert value(m, "kvscope:requests_total", outcome="error") == 0
        assert "late" not in engine.store.sessions and value(m, "kvscope:sessions", state="active") == 0


def test_a_draining_server_refuses_new_and_waiting_requests_and_finishes_the_running_one(tiny_chat_model):
    with serving(*tiny_chat_model, budget_tokens=4 * 576) as (srv, engine, client):
        state = srv.app.state.kv
        engine.lock.acquire()
        pool = ThreadPoolExecutor(2)
        try:
            running = pool.submit(ask, client, "a")
            wait_for(srv, "kvscope:num_requests_running", 1)
            waiting = pool.submit(ask, client, "b")
            wait_for(srv, "kvscope:num_requests_waiting", 1)
            assert state.drain() == 1
        finally:
            engine.lock.release()
        assert running.result(timeout=60).choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.InternalServerError, match="shutting down") as err:
            waiting.result(timeout=60)
        assert err.value.status_code == 503 and "retry-after" in err.value.response.headers
        with pytest.raises(openai.InternalServerError, match="shutting down"):
            ask(client, "c")
        assert engine.session("b").state == "new" and engine.store.used().tokens == engine.session("a").capacity_tokens
