"""Starting a real server on 127.0.0.1 (a free port) in this process, and reading its /metrics."""

from __future__ import annotations

import urllib.request
from contextlib import contextmanager

import openai
from prometheus_client.parser import text_string_to_metric_families

from kvscope.chat import ChatEngine
from kvscope.serve import ServerThread, create_app


@contextmanager
def serving(model, tokenizer, *, name: str = "tiny", max_waiting: int = 16, max_new_tokens: int = 16, **engine_kw):
    """(server, engine, openai client) for the duration of the block; the server is stopped afterwards."""
    engine = ChatEngine(model, tokenizer, **({"session_budget": 512, "chunk_size": 64} | engine_kw))
    server = ServerThread(create_app(engine, model_name=name, max_waiting=max_waiting,
                                     max_new_tokens=max_new_tokens)).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    try:
        yield server, engine, client
    finally:
        server.stop()


def scrape(url: str) -> dict[tuple, float]:
    """/metrics as {(sample name, ((label, value), ...)): value}."""
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]
