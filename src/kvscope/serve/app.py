"""The HTTP API: OpenAI-compatible chat completions (streamed by server-sent events or not), models, health, sessions
and Prometheus metrics, over one `ChatEngine`.

A request is admitted in three steps, each of which can refuse it with a reason and, when waiting would help, a
`Retry-After` header: the server is not shutting down (503), the queue has room (429), and the session store can
charge the session's KV (503 when every session holding KV is busy). Nothing is dropped silently: a request is
answered, refused, or counted as cancelled when its client went away.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from kvscope.chat.history import TooLongError
from kvscope.chat.store import SessionBusyError, StoreFullError, UnknownSessionError
from kvscope.errors import KvscopeError, UsageError
from kvscope.runtime import Sampling
from kvscope.serve import schemas
from kvscope.serve.metrics import ServerMetrics
from kvscope.serve.worker import Job, QueueFullError, ShuttingDownError, Worker

SESSION_HEADER = "X-Session-Id"


class ServerState:
    """What one server holds: the engine, its worker, its metrics, and whether it is draining."""

    def __init__(self, engine, *, model_name: str, max_waiting: int, max_new_tokens: int):
        self.engine, self.model_name, self.max_new_tokens = engine, model_name, max_new_tokens
        self.worker = Worker(engine, max_waiting=max_waiting, on_itl=lambda s: self.metrics.itl.observe(s))
        self.metrics = ServerMetrics(engine, self.worker.counts)
        self.draining = False

    def drain(self) -> int:
        """SIGTERM: refuse new requests and those still waiting; the running one finishes."""
        self.draining = True
        return self.worker.refuse_waiting()

    def count(self, outcome: str) -> None:
        self.metrics.requests.labels(outcome).inc()


def create_app(engine, *, model_name: str, max_waiting: int = 16, max_new_tokens: int = 256) -> FastAPI:
    state = ServerState(engine, model_name=model_name, max_waiting=max_waiting, max_new_tokens=max_new_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.drain()
        await run_in_threadpool(state.worker.join, 30)

    app = FastAPI(title="kvscope", lifespan=lifespan)
    app.state.kv = state
    _routes(app, state)
    _error_handlers(app, state)
    return app


def _routes(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    @app.get("/health")
    async def health():
        status = 503 if state.draining else 200
        return JSONResponse({"status": "draining" if state.draining else "ok", "model": state.model_name},
                            status_code=status)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "kvscope", "max_model_len": engine.max_positions}]}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/sessions")
    async def sessions():
        with engine.store.lock:
            return {"object": "list", "data": [_session_info(s) for s in engine.store.sessions.values()]}

    @app.get("/v1/sessions/{session_id}")
    async def session(session_id: str):
        return _session_info(engine.session(session_id))

    @app.delete("/v1/sessions/{session_id}")
    async def forget(session_id: str):
        engine.reset(session_id)
        return {"id": session_id, "deleted": True}

    @app.post("/v1/chat/completions")
    async def completions(body: schemas.ChatRequest, request: Request):
        return await _complete(state, body, request)


async def _complete(state: ServerState, body: schemas.ChatRequest, request: Request):
    engine = state.engine
    if state.draining:
        raise ShuttingDownError("the server is shutting down")
    if body.model != state.model_name:
        state.count("error")
        return _error(404, f"model {body.model!r} is not served here; this server serves {state.model_name!r} "
                      "(GET /v1/models)", kind="not_found_error", param="model", code="model_not_found")
    messages = [m.plain() for m in body.messages]
    max_tokens = body.max_completion_tokens or body.max_tokens or state.max_new_tokens
    key = request.headers.get(SESSION_HEADER) or body.prompt_cache_key or body.user
    history = engine.history_for(body.history, body.history_tokens) if body.history or body.history_tokens else None
    sampling = Sampling(temperature=body.temperature or 0.0, top_p=body.top_p or 1.0, top_k=body.top_k or 0,
                        seed=body.seed)
    if state.worker.counts()[1] >= state.worker.max_waiting:
        raise QueueFullError(f"{state.worker.max_waiting} requests are waiting already (--max-waiting)")
    session = await run_in_threadpool(_admit, engine, key, messages, max_tokens, history)
    job = Job(session=session, messages=messages, max_tokens=max_tokens, sampling=sampling, stop=body.stops(),
              loop=asyncio.get_running_loop())
    try:
        state.worker.submit(job)
    except Exception:
        engine.release(session)
        raise
    first = await _next_event(job, request)
    if first is None:
        state.count("cancelled")
        return Response(status_code=499)
    if first[0] == "error":
        raise first[1]
    headers = {SESSION_HEADER: session.id}
    cid = schemas.completion_id()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(state, job, first, cid, include_usage), media_type="text/event-stream",
                                 headers=headers)
    return await _collect(state, job, first, request, cid, headers)


def _admit(engine, key, messages, max_tokens, history):
    """Off the event loop (tokenizing, and a swap-out may wait for the device): check the limits the engine can check
    without the model, then claim the session (by key or by prefix) and charge its KV."""
    text = engine.renderer.text(messages)
    strategy = history or (engine.store.sessions[key].history if key in engine.store.sessions else None) \
        or engine.history
    if strategy.name == "keep":
        engine.check_limits(len(engine.renderer.encode(text)), max_tokens)
    return engine.claim(key, text, history)


async def _next_event(job: Job, request: Request):
    """The job's next event; None (and the job cancelled) when the client disconnected while it waited."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                return None


async def _collect(state: ServerState, job: Job, event, request: Request, cid: str, headers: dict):
    text = []
    while event[0] == "token":
        text.append(event[1])
        event = await _next_event(job, request)
        if event is None:
            state.count("cancelled")
            return Response(status_code=499)
    if event[0] == "error":
        raise event[1]
    result, tail, done_at = event[1]
    _finished(state, job, result, done_at)
    return JSONResponse(schemas.completion(cid, state.model_name, result, "".join(text) + tail), headers=headers)


async def _sse(state: ServerState, job: Job, event, cid: str, include_usage: bool):
    model, finished = state.model_name, False
    try:
        yield _data(schemas.chunk(cid, model, {"role": "assistant", "content": ""}))
        while True:
            kind, payload = event
            if kind == "token" and payload:
                yield _data(schemas.chunk(cid, model, {"content": payload}))
            elif kind == "done":
                result, tail, done_at = payload
                if tail:
                    yield _data(schemas.chunk(cid, model, {"content": tail}))
                yield _data(schemas.chunk(cid, model, {}, result.finish_reason))
                if include_usage:
                    yield _data({**schemas.chunk(cid, model, {}), "choices": [], "usage": schemas.usage(result),
                                 "kvscope": schemas.kv_details(result)})
                yield "data: [DONE]\n\n"
                finished = True
                _finished(state, job, result, done_at)
                return
            elif kind == "error":
                status, body, _ = _describe(payload)
                yield _data(body)
                yield "data: [DONE]\n\n"
                finished = True
                state.count("refused" if status in (429, 503) else "error")
                return
            event = await job.events.get()
    finally:
        if not finished:  # the client went away mid-stream: stop the turn, free the session's KV
            job.cancelled.set()
            state.count("cancelled")


def _finished(state: ServerState, job: Job, result, done_at: float) -> None:
    state.count("ok")
    state.metrics.ttft.observe(done_at - result.decode_seconds - job.arrived)


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _session_info(session) -> dict:
    c = session.counters
    return {"id": session.id, "object": "session", "state": session.state, "keyed": session.keyed,
            "history": (session.history.name if session.history else None), "tokens": len(session.ids),
            "capacity_tokens": session.capacity_tokens, "turns": c.turns, "reused_tokens": c.reused_tokens,
            "computed_tokens": c.computed_tokens, "evicted_tokens": round(c.evicted_tokens, 2),
            "swaps_in": c.swaps_in, "swaps_out": c.swaps_out, "drops": c.drops, "rewinds": c.rewinds,
            "summaries": c.summaries}


# --- errors ----------------------------------------------------------------------------------------------------------
def _describe(exc: Exception) -> tuple[int, dict, bool]:
    """(status, OpenAI-style error body, whether a Retry-After helps) for an exception a request ran into."""
    import torch

    if isinstance(exc, (QueueFullError, SessionBusyError)):
        return 429, schemas.error(str(exc), kind="rate_limit_error", code=429), True
    if isinstance(exc, (StoreFullError, ShuttingDownError)):
        return 503, schemas.error(str(exc), kind="service_unavailable", code=503), True
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return 503, schemas.error(f"the device ran out of memory during this turn: {exc}", kind="server_error",
                                  code="out_of_memory"), True
    if isinstance(exc, UnknownSessionError):
        return 404, schemas.error(str(exc), kind="not_found_error", param="session_id", code=404), False
    if isinstance(exc, TooLongError):
        return 400, schemas.error(str(exc), kind="invalid_request_error", param="messages",
                                  code="context_length_exceeded"), False
    if isinstance(exc, UsageError):
        return 400, schemas.error(str(exc), kind="invalid_request_error", code=400), False
    return 500, schemas.error(f"internal error: {type(exc).__name__}: {exc}", kind="server_error", code=500), False


def _error(status: int, message: str, **fields) -> JSONResponse:
    return JSONResponse(schemas.error(message, **fields), status_code=status)


def _error_handlers(app: FastAPI, state: ServerState) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        state.count("error")
        return _error(422, f"invalid request: {field}: {first.get('msg')}", kind="invalid_request_error",
                      param=field, code=422)

    async def failed(request: Request, exc: Exception):
        status, body, retry = _describe(exc)
        if request.url.path == "/v1/chat/completions":
            state.count("refused" if retry else "error")
        headers = {"Retry-After": str(state.worker.retry_after())} if retry else None
        return JSONResponse(body, status_code=status, headers=headers)

    import torch

    app.add_exception_handler(KvscopeError, failed)  # usage errors, refusals (429/503), unknown sessions
    app.add_exception_handler(torch.cuda.OutOfMemoryError, failed)
