"""Running the API: uvicorn on a socket we bind ourselves (so `--port 0` picks a free port and says which), SIGTERM
handled by refusing what waits and finishing what runs, and a thread-hosted server for tests and notebooks.

    server = ServerThread(create_app(engine, model_name="smollm2-135m")).start()
    server.url            # http://127.0.0.1:PORT
    server.stop()
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from kvscope.errors import usage


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise usage(f"cannot listen on {host}:{port}: {exc.strerror}", expected="a free port on a local address",
                    fix="--host or --port (0 picks a free port)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class Server(uvicorn.Server):
    """uvicorn, told about SIGTERM first: the app stops taking work at once (503 with Retry-After for new and
    waiting requests), the running turn finishes, then uvicorn closes the connections and exits; the signal is not
    raised again afterwards, so the process exits 0."""

    def handle_exit(self, sig, frame) -> None:
        state = getattr(self.config.app.state, "kv", None)
        if state is not None and not state.draining:
            state.drain()
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True


def make_server(app, *, shutdown_timeout: float = 30.0, log_level: str = "warning") -> Server:
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout, lifespan="on",
                            access_log=False)
    return Server(config)


class ServerThread:
    """A server in a background thread of this process, on 127.0.0.1 and a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, shutdown_timeout: float = 10.0):
        self.app, self.sock = app, bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = make_server(app, shutdown_timeout=shutdown_timeout)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start within {timeout} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.handle_exit(None, None)
        self.thread.join(timeout)
