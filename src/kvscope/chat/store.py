"""The session store: every session, and one KV budget for all of them.

The budget counts what the sessions' caches allocate on the model's device: a session is charged its cache's slots
(its own budget + one prefill chunk, per layer) from the moment a request takes it until it is evicted. When a request
needs room, idle sessions are evicted least recently used first: swapped to pinned CPU memory where the KV lives on a
CUDA device (within `swap_bytes` of host memory), dropped for recompute otherwise (on the CPU a swap would free
nothing). A session that a request holds (`busy`) is never evicted; when only busy sessions are left and the new one
still does not fit, the request is refused with a `StoreFullError` (the server answers 503 with Retry-After).

    store = SessionStore(slot_bytes=46080, budget_tokens=16384)
    store.take(session, need_tokens)    # charge it (evicting others), mark it busy
    store.give_back(session)            # idle again; its KV stays resident until evicted
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from kvscope.chat.session import Session, SessionCounters
from kvscope.errors import KvscopeError, UsageError, usage


class StoreFullError(KvscopeError):
    """Every session holding KV is busy and the new one does not fit in what is left of the budget."""


class SessionBusyError(KvscopeError):
    """A session already has a request in flight (one turn at a time per conversation)."""


class UnknownSessionError(UsageError):
    """No session has that id."""


@dataclass(frozen=True)
class Charge:
    tokens: int
    bytes: int


@dataclass
class StoreSnapshot:
    """What the store holds now (read for /metrics and `/stats`)."""

    used_tokens: int
    budget_tokens: int
    used_bytes: int
    budget_bytes: int
    held_tokens: int  # history tokens whose KV is resident (before what the sessions' policies evicted)
    swapped_bytes: int
    states: dict[str, int]
    totals: SessionCounters
    in_bytes: bool = False  # which unit the budget binds in

    @property
    def usage(self) -> float:
        """Fraction of the budget in use, in the unit the budget was given in."""
        if self.in_bytes:
            return self.used_bytes / self.budget_bytes
        return self.used_tokens / self.budget_tokens


class SessionStore:
    """Sessions by id, in least-recently-used order, and the device KV charged to them.

    Args:
        slot_bytes: bytes of one slot (one token in every layer) of a session's cache.
        budget_tokens / budget_bytes: the global KV budget, in slots per layer or in bytes (exactly one).
        fixed_bytes: bytes a cache costs whatever its size (int4's window of recent tokens), charged per session.
        swap_bytes: pinned host memory for swapped sessions; past it the least recently used are dropped.
        max_sessions: records kept; past it the least recently used idle sessions are forgotten.
    """

    def __init__(self, *, slot_bytes: int, budget_tokens: int | None = None, budget_bytes: int | None = None,
                 fixed_bytes: int = 0, swap_bytes: int = 4 << 30, max_sessions: int = 1024):
        if (budget_tokens is None) == (budget_bytes is None):
            raise usage("give exactly one of budget_tokens and budget_bytes",
                        fix="--total-budget or --total-budget-bytes")
        for name, value in (("budget_tokens", budget_tokens), ("budget_bytes", budget_bytes),
                            ("max_sessions", max_sessions)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise usage(f"{name} must be a whole number >= 1, got {value!r}", fix=f"--{name.replace('_', '-')}")
        self.slot_bytes, self.fixed_bytes = slot_bytes, fixed_bytes
        self.in_bytes = budget_bytes is not None
        self.budget_bytes = budget_bytes if self.in_bytes else budget_tokens * slot_bytes
        self.budget_tokens = budget_tokens if not self.in_bytes else budget_bytes // slot_bytes
        self.swap_bytes, self.max_sessions = swap_bytes, max_sessions
        self.sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self.charged: dict[str, Charge] = {}  # device KV per session (held, or reserved for a turn about to run)
        self.host: dict[str, int] = {}  # bytes of swapped sessions in pinned CPU memory
        self.retired = SessionCounters()  # counters of forgotten sessions, so totals never go down
        self.lock = threading.RLock()

    # --- records ---------------------------------------------------------------------------------------------------
    def get(self, session_id: str) -> Session:
        with self.lock:
            if session_id not in self.sessions:
                known = list(self.sessions)
                raise UnknownSessionError(
                    f"no session {session_id!r}; the store holds {len(known)} session(s)"
                    + (f" (e.g. {', '.join(map(repr, known[-3:]))})" if known else "")
                    + "; change the session id, or send a first turn to start it")
            return self.sessions[session_id]

    def get_or_add(self, session_id: str, make: Callable[[], Session]) -> Session:
        with self.lock:
            if session_id in self.sessions:
                return self.sessions[session_id]
            session = make()
            self.sessions[session.id] = session
            self._forget_beyond_limit()
            return session

    def remove(self, session_id: str) -> None:
        """Forget a session and free its KV (a busy session cannot be removed)."""
        with self.lock:
            session = self.get(session_id)
            if session.busy:
                raise SessionBusyError(f"session {session_id!r} has a request in flight; retry when it is done")
            self._evict(session, allow_swap=False)
            self.retired.add(session.counters)
            del self.sessions[session_id]

    def anonymous(self) -> list[Session]:
        """Sessions found by prefix matching, most recently used first."""
        with self.lock:
            return [s for s in reversed(self.sessions.values()) if not s.keyed]

    # --- the budget ------------------------------------------------------------------------------------------------
    def charge_for(self, tokens: int) -> Charge:
        return Charge(tokens, tokens * self.slot_bytes + self.fixed_bytes)

    def check_fits(self, tokens: int, option: str = "--total-budget") -> None:
        """A `UsageError` when one session of `tokens` slots could never fit, naming the minimum."""
        need = self.charge_for(tokens)
        if not self._within(need, Charge(0, 0)):
            raise usage(f"one session needs {need.tokens} KV slots per layer ({need.bytes:,} bytes: its budget plus "
                        f"one prefill chunk) but the global budget is {self.budget_tokens} slots "
                        f"({self.budget_bytes:,} bytes)",
                        expected=f"a global budget of at least {need.tokens} tokens ({need.bytes:,} bytes)",
                        fix=f"{option}, or a smaller --budget or --chunk-size")

    def take(self, session: Session, tokens: int) -> list[tuple[Session, str]]:
        """Mark `session` busy and charge it `tokens` slots unless its KV is resident already, evicting idle sessions
        (least recently used first) to make room. Returns the evictions made, as (session, "swap" | "drop")."""
        with self.lock:
            if session.busy:
                raise SessionBusyError(f"session {session.id!r} has a request in flight; one turn at a time per "
                                       "session: retry when it is done")
            evicted: list[tuple[Session, str]] = []
            if session.id not in self.charged:
                need = self.charge_for(session.capacity_tokens if session.swapped else tokens)
                self.check_fits(need.tokens)
                while not self._room_for(need):
                    victim = self._victim(session)
                    if victim is None:
                        raise self._full(session, need)
                    evicted.append((victim, self._evict(victim, allow_swap=True)))
                self.charged[session.id] = need
                session.capacity_tokens = need.tokens
            session.busy = True
            session.touch()
            self.sessions.move_to_end(session.id)
            return evicted

    def settle(self, session: Session, tokens: int) -> None:
        """The cache was built: charge what it allocated (at most what was reserved)."""
        with self.lock:
            self.charged[session.id] = self.charge_for(tokens)
            session.capacity_tokens = tokens

    def unswapped(self, session: Session) -> None:
        with self.lock:
            self.host.pop(session.id, None)

    def give_back(self, session: Session, *, keep_kv: bool = True) -> None:
        """The request is done: the session is idle (or, without `keep_kv`, its KV is freed)."""
        with self.lock:
            session.busy = False
            session.touch()
            if not keep_kv or session.cache is None:
                self._evict(session, allow_swap=False)
            self._forget_beyond_limit()

    def evict(self, session: Session, *, allow_swap: bool = True) -> str:
        """Free an idle session's device KV: "swap" (CUDA, within swap_bytes) or "drop"; "none" if it held none."""
        with self.lock:
            if session.busy:
                raise SessionBusyError(f"session {session.id!r} has a request in flight; it cannot be evicted now")
            if session.id not in self.charged:
                return "none"
            return self._evict(session, allow_swap=allow_swap)

    def _room_for(self, need: Charge) -> bool:
        return self._within(need, self.used())

    def _within(self, need: Charge, used: Charge) -> bool:
        # the budget binds in its own unit: bytes include int4's fixed window per session, tokens do not
        if self.in_bytes:
            return used.bytes + need.bytes <= self.budget_bytes
        return used.tokens + need.tokens <= self.budget_tokens

    def used(self) -> Charge:
        with self.lock:
            return Charge(sum(c.tokens for c in self.charged.values()), sum(c.bytes for c in self.charged.values()))

    def _victim(self, keep: Session) -> Session | None:
        return next((s for s in self.sessions.values() if s.id in self.charged and not s.busy and s is not keep), None)

    def _evict(self, session: Session, *, allow_swap: bool) -> str:
        charge = self.charged.pop(session.id, None)
        if allow_swap and charge is not None and session.can_swap() and charge.bytes <= self.swap_bytes:
            while sum(self.host.values()) + charge.bytes > self.swap_bytes:
                oldest = next(s for s in self.sessions.values() if s.id in self.host)
                self.host.pop(oldest.id)
                oldest.drop()
            session.swap_out()
            self.host[session.id] = charge.bytes
            return "swap"
        self.host.pop(session.id, None)
        session.drop()
        return "drop"

    def _full(self, session: Session, need: Charge) -> StoreFullError:
        busy = [s for s in self.sessions.values() if s.busy and s.id in self.charged]
        used = self.used()
        return StoreFullError(
            f"the KV budget is full of active sessions: {len(busy)} busy session(s) hold {used.tokens} of "
            f"{self.budget_tokens} slots ({used.bytes:,} of {self.budget_bytes:,} bytes) and session {session.id!r} "
            f"needs {need.tokens} more; nothing idle is left to swap or drop; retry when a request finishes, or "
            "raise --total-budget (or lower --budget)")

    def _forget_beyond_limit(self) -> None:
        while len(self.sessions) > self.max_sessions:
            oldest = next((s for s in self.sessions.values() if not s.busy), None)
            if oldest is None:
                return
            self._evict(oldest, allow_swap=False)
            self.retired.add(oldest.counters)
            del self.sessions[oldest.id]

    # --- reading ---------------------------------------------------------------------------------------------------
    def snapshot(self) -> StoreSnapshot:
        with self.lock:
            used = self.used()
            states = {"active": 0, "idle": 0, "swapped": 0, "dropped": 0, "new": 0}
            totals = SessionCounters()
            totals.add(self.retired)
            held = 0
            for s in self.sessions.values():
                states[s.state] += 1
                totals.add(s.counters)
                if s.cache is not None and not s.swapped:
                    held += len(s.ids)
            return StoreSnapshot(used_tokens=used.tokens, budget_tokens=self.budget_tokens, used_bytes=used.bytes,
                                 budget_bytes=self.budget_bytes, held_tokens=held,
                                 swapped_bytes=sum(self.host.values()), states=states, totals=totals,
                                 in_bytes=self.in_bytes)
