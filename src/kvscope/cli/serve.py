"""Serve a model over an OpenAI-compatible HTTP API with KV reuse across turns and Prometheus metrics.

Endpoints: POST /v1/chat/completions (streaming or not), GET /v1/models, GET /health, GET /metrics,
GET/DELETE /v1/sessions[/ID]. A conversation is keyed by the X-Session-Id header, the `prompt_cache_key` or the `user`
field; with no key, the session whose last request is the longest prefix of the new one is continued. SIGTERM refuses
waiting and new requests (503 with Retry-After), lets the running one finish, and exits 0.
"""

from __future__ import annotations

from kvscope.cli import common, output

HELP = "OpenAI-compatible chat server: KV reuse across turns, a global KV budget, /metrics"
PARENTS = ("model", "cache")  # --budget: KV tokens per layer each session keeps


def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one and prints it)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: MODEL's name)")
    total = p.add_mutually_exclusive_group()
    total.add_argument("--total-budget", type=int, default=None,
                       help="KV budget of the whole server, tokens per layer over all sessions (default: 8 sessions)")
    total.add_argument("--total-budget-bytes", default=None, help="the server's KV budget in bytes, e.g. 2GiB")
    p.add_argument("--history", choices=("keep", "truncate", "summarize"), default="keep",
                   help="default history strategy (a request may send its own `history`)")
    p.add_argument("--history-tokens", type=int, default=None, help="limit for truncate/summarize (default: "
                   "--budget)")
    common.add_new_tokens(p, 256, "new tokens when a request sends no max_tokens")
    p.add_argument("--max-waiting", type=int, default=16, help="requests queued before 429 (default 16)")
    p.add_argument("--max-sessions", type=int, default=1024, help="session records kept (default 1024)")
    p.add_argument("--swap-space", default="4GiB", help="pinned CPU memory for swapped sessions, CUDA only "
                   "(default 4GiB)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds a running request may take to finish after SIGTERM (default 30)")


def run(args) -> int:
    from kvscope.chat import ChatEngine
    from kvscope.errors import require_positive, usage
    from kvscope.planner.sizes import format_bytes, parse_size
    from kvscope.policies import get
    from kvscope.serve import bind, create_app, make_server

    common.check_policy_args(args)
    args.chunk_size = common.chunk_size(args)
    policy = get(common.policy_name(args), **common.knobs(args))
    for option in ("budget", "total_budget", "chunk_size", "history_tokens", "new_tokens", "max_waiting",
                   "max_sessions", "shutdown_timeout"):
        if getattr(args, option) is not None:
            require_positive(f"--{option.replace('_', '-')}", getattr(args, option),
                             option=f"--{option.replace('_', '-')}")
    if args.budget is not None:
        policy.check_budget(args.budget)
    budget_bytes = parse_size(args.total_budget_bytes, option="--total-budget-bytes") if args.total_budget_bytes \
        else None
    swap_bytes = parse_size(args.swap_space, option="--swap-space")
    if not 0 <= args.port <= 65535:
        raise usage(f"port {args.port} is out of range", expected="0 to 65535", fix="--port")
    sock = bind(args.host, args.port)  # before the model loads: a busy port fails at once
    loaded = common.load_model(args)
    if loaded.tokenizer is None:
        raise usage(f"{args.model} has no tokenizer, so it cannot serve chat messages",
                    expected="a model directory with tokenizer files, a .gguf, or smollm2-135m", fix="MODEL")
    session_budget = args.budget or min(loaded.spec.max_position_embeddings, 4096)
    budget = args.total_budget
    if budget is None and budget_bytes is None:
        budget = 8 * (session_budget + args.chunk_size)
    engine = ChatEngine(loaded.model, loaded.tokenizer, policy=policy.name, knobs=common.knobs(args),
                        session_budget=session_budget,
                        kv_dtype=args.kv_dtype, chunk_size=args.chunk_size, budget_tokens=budget,
                        budget_bytes=budget_bytes, history=args.history, history_tokens=args.history_tokens,
                        swap_bytes=swap_bytes, max_sessions=args.max_sessions, recall=args.recall)
    name = args.served_model_name or loaded.spec.name
    app = create_app(engine, model_name=name, max_waiting=args.max_waiting, max_new_tokens=args.new_tokens)
    host, port = sock.getsockname()[:2]
    snap = engine.store.snapshot()
    per_session = engine.store.charge_for(engine.config.capacity(args.chunk_size))
    output.stdout.print(
        f"kvscope serve: {name} on http://{host}:{port} (OpenAI API at /v1, metrics at /metrics); KV budget "
        f"{snap.budget_tokens} tokens ({format_bytes(snap.budget_bytes)}), sessions of {session_budget} tokens "
        f"({format_bytes(per_session.bytes)} each with one chunk): {snap.budget_bytes // per_session.bytes} resident "
        f"at once; policy {policy.name}", markup=False, highlight=False)
    server = make_server(app, shutdown_timeout=args.shutdown_timeout)
    server.run(sockets=[sock])
    output.stdout.print("kvscope serve: stopped", markup=False)
    return 0
