"""The OpenAI-compatible HTTP server over a `ChatEngine`, with Prometheus metrics. See docs/chat.md."""

from kvscope.serve.app import SESSION_HEADER, create_app
from kvscope.serve.server import ServerThread, bind, make_server

__all__ = ["SESSION_HEADER", "ServerThread", "bind", "create_app", "make_server"]
