"""Faults: a client that disconnects mid-stream frees its slot and its session's KV; SIGTERM on `kvscope serve`
finishes the running request, refuses the waiting one with 503, and exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest

from tests.chat.models import tiny_chat_dir
from tests.serve.helpers import scrape, serving, value

LONG = [{"role": "user", "content": "Tell me everything about bicycles."}]


def test_a_client_that_disconnects_mid_stream_frees_its_slot_and_kv(tiny_chat_model):
    with serving(*tiny_chat_model, session_budget=1900, budget_tokens=2 * 1964) as (srv, engine, client):
        client.chat.completions.create(model="tiny", messages=LONG, max_tokens=2, user="other")
        before = scrape(srv.url)
        stream = client.chat.completions.create(model="tiny", messages=LONG, max_tokens=1800, stream=True,
                                                user="leaver")
        got = [next(stream) for _ in range(4)]
        assert any(c.choices[0].delta.content for c in got)
        stream.close()  # the client goes away mid-stream
        deadline = time.monotonic() + 60
        while value(scrape(srv.url), "kvscope:requests_total", outcome="cancelled") < 1:
            assert time.monotonic() < deadline, "the server never noticed the disconnect"
            time.sleep(0.05)
        m = scrape(srv.url)
        while value(m, "kvscope:num_requests_running") != 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
            m = scrape(srv.url)
        leaver = engine.session("leaver")
        assert leaver.state == "dropped" and leaver.counters.generated_tokens < 1800  # stopped early, KV freed
        assert value(m, "kvscope:kv_used_tokens") == value(before, "kvscope:kv_used_tokens")
        assert value(m, "kvscope:sessions", state="active") == 0
        again = client.chat.completions.create(model="tiny", messages=LONG, max_tokens=2, user="leaver")
        assert again.model_extra["kvscope"]["restore"] == "recompute"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_chat_model):
    return tiny_chat_dir(tmp_path_factory.mktemp("tiny-chat"))


def start_server(model_dir):
    cmd = [sys.executable, "-m", "kvscope", "serve", str(model_dir), "--port", "0", "--budget", "1900",
           "--total-budget", "8000", "--chunk-size", "64", "--served-model-name", "tiny", "--shutdown-timeout", "300"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    assert match, line + proc.stderr.read()
    return proc, f"http://127.0.0.1:{match.group(1)}"


def test_sigterm_finishes_the_running_request_refuses_the_waiting_one_and_exits_0(model_dir):
    proc, url = start_server(model_dir)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        stream = client.chat.completions.create(model="tiny", messages=LONG, max_tokens=600, stream=True, user="a")
        first = next(stream)
        outcome = {}

        def waiting():
            try:
                client.chat.completions.create(model="tiny", messages=LONG, max_tokens=4, user="b")
                outcome["b"] = "answered"
            except openai.APIStatusError as exc:
                outcome["b"] = (exc.status_code, exc.response.headers.get("retry-after"))

        thread = threading.Thread(target=waiting)
        thread.start()
        deadline = time.monotonic() + 30
        while value(scrape(url), "kvscope:num_requests_waiting") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)
        thread.join(60)
        assert first.choices[0].delta.role == "assistant"
        assert rest[-1].choices[0].finish_reason == "length"  # the running request ran to its end
        assert outcome["b"][0] == 503 and int(outcome["b"][1]) >= 1
        assert proc.wait(60) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
