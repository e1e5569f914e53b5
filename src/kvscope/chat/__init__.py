"""Multi-turn chat: sessions that reuse their KV across turns, a session store with one global KV budget, and
history strategies (keep, truncate, summarize). See docs/chat.md."""

from kvscope.chat.engine import ChatEngine, TurnResult
from kvscope.chat.history import STRATEGIES, History, TooLongError
from kvscope.chat.session import Session, SessionConfig, SessionCounters
from kvscope.chat.store import SessionBusyError, SessionStore, StoreFullError, UnknownSessionError

__all__ = ["STRATEGIES", "ChatEngine", "History", "Session", "SessionBusyError", "SessionConfig", "SessionCounters",
           "SessionStore", "StoreFullError", "TooLongError", "TurnResult", "UnknownSessionError"]
