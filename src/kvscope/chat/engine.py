"""`ChatEngine`: multi-turn chat over one model, each session continuing its own KV cache.

    engine = ChatEngine(model, tokenizer, policy="full", session_budget=2048)
    session = engine.open()
    r1 = engine.chat(session, [{"role": "user", "content": "Hi"}])
    r2 = engine.chat(session, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": r1.text},
                               {"role": "user", "content": "And then?"}])
    r2.reused_tokens    # the first turn's KV was reused; only the new turn was prefilled

Turns run one at a time (one model, one lock): sessions have separate caches, so decodes of several sessions are not
batched. A turn: take the session in the store (charging its KV, evicting idle sessions), apply the history strategy,
render the prompt, bring the KV back (swap in, or rebuild when it was dropped), keep the longest common prefix of ids,
rewind past it, prefill the rest and decode. The token-id API (`generate_ids`) is the same turn without a tokenizer.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvscope.cache.recall import check_recall
from kvscope.chat.history import SUMMARY_REQUEST, History, TooLongError, check_messages
from kvscope.chat.prompt import Renderer
from kvscope.chat.session import Session, SessionConfig, common_prefix, fixed_bytes, slot_bytes
from kvscope.chat.store import SessionStore
from kvscope.errors import usage
from kvscope.policies import get as get_policy
from kvscope.runtime import Sampling, generate
from kvscope.runtime.stops import cut_at_stop

TokenSink = Callable[[int], bool | None]  # one new token id -> True to stop (e.g. the client went away)
SUMMARY_TOKENS = 96


@dataclass
class TurnResult:
    session_id: str
    ids: list[int]  # the reply's ids, without the stop token
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    reused_tokens: int  # prompt tokens whose KV was already held (prefix hit)
    computed_tokens: int  # prompt tokens prefilled this turn
    evicted_tokens: float  # evicted by the session's policy during the turn, mean over layers
    cached_tokens: int  # tokens the session's cache holds after the turn (the fullest layer row)
    first_token_seconds: float  # prefill and the first token's pick (the runtime's figure)
    first_token_at: float  # time.perf_counter() when the first new token was picked
    decode_seconds: float
    decode_tokens_per_second: float | None
    restore: str  # how the KV was found: "resident", "swap-in", "recompute" (it had been dropped) or "new"
    restore_seconds: float
    text: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)


class ChatEngine:
    """Sessions over one model under one global KV budget.

    Args:
        model, tokenizer: from `kvscope.load`; without a tokenizer only `generate_ids` works.
        policy, session_budget, kv_dtype, chunk_size: each session's own cache (session_budget in tokens per layer;
            default the model's maximum positions, at most 8192).
        budget_tokens / budget_bytes: the global KV budget over all sessions (default: room for one session).
        history, history_tokens: the default history strategy (`keep`, `truncate`, `summarize`) and its limit
            (default: the session budget).
        swap_bytes: pinned CPU memory for swapped sessions (CUDA only). max_sessions: session records kept.
        summary_tokens: the most tokens a summary (history `summarize`) may take.
        recall: "cpu" keeps what a turn's chunked prefill evicts in host memory until the turn's last chunk (the
            question) picks what comes back (kvscope.cache.recall).
    """

    def __init__(self, model, tokenizer=None, *, policy: str = "full", session_budget: int | None = None,
                 kv_dtype: str | None = None, chunk_size: int = 512, budget_tokens: int | None = None,
                 budget_bytes: int | None = None, history: str = "keep", history_tokens: int | None = None,
                 swap_bytes: int = 4 << 30, max_sessions: int = 1024, eos_token_id: int | list[int] | None = None,
                 summary_tokens: int = SUMMARY_TOKENS, knobs: dict | None = None, recall: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.renderer = Renderer(tokenizer) if tokenizer is not None else None
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        session_budget = session_budget or min(self.max_positions or 8192, 8192)
        chosen = get_policy(policy, **(knobs or {}))
        chosen.check_budget(session_budget)
        check_recall(chosen, False, recall)
        self.config = SessionConfig(policy=policy, budget_tokens=session_budget, kv_dtype=kv_dtype,
                                    chunk_size=chunk_size, knobs=tuple(sorted((knobs or {}).items())), recall=recall)
        self.history = self.history_for(history, history_tokens)
        per_slot = slot_bytes(model, kv_dtype)
        if budget_tokens is None and budget_bytes is None:
            budget_tokens = self.config.capacity(chunk_size)
        self.store = SessionStore(slot_bytes=per_slot, budget_tokens=budget_tokens, budget_bytes=budget_bytes,
                                  fixed_bytes=fixed_bytes(model, kv_dtype), swap_bytes=swap_bytes,
                                  max_sessions=max_sessions)
        self.store.check_fits(self.config.capacity(chunk_size))
        self.eos = _eos_ids(model, tokenizer) if eos_token_id is None else _as_list(eos_token_id)
        self.summary_tokens = summary_tokens
        self.lock = threading.RLock()  # one model: one turn at a time
        self.oom_events = 0

    # --- sessions --------------------------------------------------------------------------------------------------
    def history_for(self, name: str | None, limit: int | None) -> History:
        name = name or "keep"
        return History(name, limit or (self.config.budget_tokens if name != "keep" else None))

    def open(self, session_id: str | None = None, *, keyed: bool = True, history: History | None = None) -> Session:
        """The session with this id, created if new (a random id when none is given)."""
        sid = session_id or f"s-{uuid.uuid4().hex[:12]}"
        session = self.store.get_or_add(sid, lambda: Session(sid, self.config, keyed=keyed, history=history))
        if history is not None:
            session.history = history
        return session

    def session(self, session_id: str) -> Session:
        """An existing session; an unknown id is an `UnknownSessionError` (a `UsageError`)."""
        return self.store.get(session_id)

    def reset(self, session_id: str) -> None:
        """Forget a session and free its KV."""
        self.store.remove(session_id)

    def claim(self, key: str | None, match_text: str | None = None, history: History | None = None) -> Session:
        """Take a session for a request: by key, or else the anonymous session whose last request is the longest
        prefix of this one (`match_text`: the request's messages rendered), or a new anonymous session."""
        with self.store.lock:
            known = set(self.store.sessions)
            if key is not None:
                session = self.open(key, keyed=True, history=history)
            else:
                session = self._match(match_text) or self.open(keyed=False, history=history)
            try:
                self.admit(session)
            except Exception:
                if session.id not in known:  # a refused request leaves no record behind
                    self.store.remove(session.id)
                raise
            if match_text is not None:
                session.match_text = match_text
            return session

    def _match(self, text: str | None) -> Session | None:
        if not text:
            return None
        hits = [s for s in self.store.anonymous() if not s.busy and s.match_text and text.startswith(s.match_text)]
        return max(hits, key=lambda s: len(s.match_text), default=None)

    def admit(self, session: Session) -> None:
        """Charge the session's KV in the store (evicting idle sessions) and mark it busy: `StoreFullError` when
        only busy sessions are left, `SessionBusyError` when it is busy already."""
        self.store.take(session, self.config.capacity(self.config.chunk_size))

    def release(self, session: Session, *, keep_kv: bool = True) -> None:
        self.store.give_back(session, keep_kv=keep_kv)

    def evict(self, session: Session, *, swap: bool = True) -> str:
        """Free an idle session's device KV now, as the store would under pressure: "swap" or "drop"."""
        return self.store.evict(session, allow_swap=swap)

    # --- turns -----------------------------------------------------------------------------------------------------
    def chat(self, session: Session, messages: list[dict], *, max_new_tokens: int = 256,
             sampling: Sampling | None = None, stop: list[str] | None = None,
             on_token: TokenSink | None = None) -> TurnResult:
        """One turn from the whole conversation so far (OpenAI-style messages, the last one from the user)."""
        self.admit(session)
        try:
            return self.run_chat(session, messages, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop,
                                 on_token=on_token)
        finally:
            self.release(session)

    def generate_ids(self, session: Session, prompt_ids: list[int], *, max_new_tokens: int = 256,
                     sampling: Sampling | None = None, ignore_eos: bool = False,
                     on_token: TokenSink | None = None) -> TurnResult:
        """One turn from token ids: `prompt_ids` is the whole conversation so far; the held prefix is reused."""
        self.admit(session)
        try:
            with self.lock:
                result = self._run_ids(session, list(prompt_ids), max_new_tokens, sampling, None, on_token,
                                       eos=[] if ignore_eos else self.eos)
                session.counters.turns += 1
                return result
        finally:
            self.release(session)

    def run_chat(self, session: Session, messages: list[dict], *, max_new_tokens: int = 256,
                 sampling: Sampling | None = None, stop: list[str] | None = None,
                 on_token: TokenSink | None = None) -> TurnResult:
        """`chat` for a session already admitted (the server admits at request time, runs in its worker)."""
        renderer = self._renderer()
        messages = check_messages(messages)
        history = session.history or self.history
        with self.lock:
            prepared, session.summary = history.prepare(
                messages, max_new_tokens, renderer.count, session.summary,
                lambda covered: self._summarize(session, covered))
            ids = renderer.ids(prepared, session.ids)
            result = self._run_ids(session, ids, max_new_tokens, sampling, stop, on_token, eos=self.eos)
            session.counters.turns += 1
        result.text = cut_at_stop(renderer.decode(result.ids), stop)
        return result

    def _summarize(self, session: Session, covered: list[dict]) -> str:
        renderer = self._renderer()
        ids = renderer.ids(covered + [{"role": "user", "content": SUMMARY_REQUEST}], session.ids)
        result = self._run_ids(session, ids, self.summary_tokens, None, None, None, eos=self.eos)
        session.counters.summaries += 1
        return renderer.decode(result.ids).strip() or "(no summary)"

    def _run_ids(self, session: Session, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling | None,
                 stop: list[str] | None, on_token: TokenSink | None, eos: list[int]) -> TurnResult:
        if not session.busy:
            raise usage(f"session {session.id!r} was not admitted", expected="engine.admit(session) first",
                        fix="call chat() / generate_ids(), or admit() before run_chat()")
        self.check_limits(len(prompt_ids), max_new_tokens)
        restore, restore_s = self._restore(session)
        reused = common_prefix(session.ids, prompt_ids)
        if reused == len(prompt_ids):  # the whole prompt is held: feed its last token again for the next logits
            reused -= 1
        session.rewind_to(reused)
        new = prompt_ids[reused:]
        if session.cache is None:
            session.build_cache(self.model)
            self.store.settle(session, self.config.capacity(min(len(new), self.config.chunk_size)))
        started = time.perf_counter()
        try:
            gen = generate(self.model, torch.tensor([new]), session.cache, max_new_tokens=max_new_tokens,
                           chunk_size=self.config.chunk_size, eos_token_id=eos or None, stop_strings=stop or None,
                           tokenizer=self.tokenizer if stop else None, sampling=sampling,
                           on_token=_sink(on_token))
        except BaseException as exc:  # the cache's content is unknown after a failed forward: recompute next time
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                self.oom_events += 1
            session.discard()
            raise
        session.ids = prompt_ids + gen.sequences[0, :gen.fed_tokens].tolist()
        evicted = session.cache.take_stats().evicted_tokens / max(1, len(session.cache.layers))
        c = session.counters
        c.reused_tokens += reused
        c.computed_tokens += len(new)
        c.generated_tokens += gen.lengths[0]
        c.evicted_tokens += evicted
        return TurnResult(session_id=session.id, ids=gen.row(0), finish_reason=gen.finish_reasons[0],
                          prompt_tokens=len(prompt_ids), reused_tokens=reused, computed_tokens=len(new),
                          evicted_tokens=evicted, cached_tokens=session.held_tokens(),
                          first_token_seconds=gen.first_token_seconds, decode_seconds=gen.decode_seconds,
                          first_token_at=started + gen.first_token_seconds,
                          restore=restore, restore_seconds=restore_s,
                          decode_tokens_per_second=gen.decode_tokens_per_second)

    def _restore(self, session: Session) -> tuple[str, float]:
        if session.swapped:
            seconds = session.swap_in()
            self.store.unswapped(session)
            return "swap-in", seconds
        if session.cache is not None:
            return "resident", 0.0
        return ("recompute" if session.counters.turns else "new"), 0.0

    def check_limits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """`TooLongError` for a turn that the model's positions or (under `full`) the session budget cannot hold."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise usage(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}",
                        fix="max_tokens (--new-tokens)")
        if self.max_positions and prompt_tokens + max_new_tokens > self.max_positions:
            raise TooLongError(
                f"the prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for, "
                f"{prompt_tokens + max_new_tokens} in all, over the model's {self.max_positions} positions; expected "
                "a shorter history or fewer new tokens; change --history truncate, --history-tokens or max_tokens")
        need = prompt_tokens + max_new_tokens - 1  # the last new token is never stored
        if not get_policy(self.config.policy).evicts and need > self.config.budget_tokens:
            raise TooLongError(
                f"the prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for: the session "
                f"needs {need} KV tokens but its budget is {self.config.budget_tokens} under policy "
                f"{self.config.policy!r} (it never evicts); expected a budget of at least {need}; change --budget, "
                "--history truncate or summarize, max_tokens, or an evicting --policy")

    def _renderer(self) -> Renderer:
        if self.renderer is None:
            Renderer(None)  # raises the usage error naming the token-id API
        return self.renderer


def _sink(on_token: TokenSink | None):
    if on_token is None:
        return None
    return lambda step, ids: on_token(ids[0])


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    return _as_list(eos)


def _as_list(eos) -> list[int]:
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

