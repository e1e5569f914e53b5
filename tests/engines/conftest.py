"""A real HTTP server on 127.0.0.1 that serves engine metrics which change on every scrape (no engine installed)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.engines.engine_metrics import RENDER, State

FIXTURES = Path(__file__).parent / "fixtures"


class MetricsServer:
    """Serves `render(scenario(n))` for the n-th GET (n = 1, 2, ...); `body` overrides it with fixed text."""

    def __init__(self, engine: str, scenario: Callable[[int], State] | None = None, *, body: str | None = None,
                 status: int = 200, stop_after: int | None = None) -> None:
        self.scrapes = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                server.scrapes += 1
                if stop_after is not None and server.scrapes > stop_after:
                    self.close_connection = True
                    self.send_response(503)
                    self.end_headers()
                    return
                text = body if body is not None else RENDER[engine](scenario(server.scrapes))
                payload = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def metrics_server() -> Iterator[Callable[..., MetricsServer]]:
    servers: list[MetricsServer] = []

    def start(*args, **kwargs) -> MetricsServer:
        servers.append(MetricsServer(*args, **kwargs))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
