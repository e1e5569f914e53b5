"""Chat with a model in the terminal. Each turn continues the session's KV cache: only the new message is prefilled.

After each reply a line shows what the cache did: tokens cached, reused (prefix hit) and computed this turn, tokens
evicted by the policy, time to first token and decode speed. Commands: /stats, /reset, /quit. Lines can be piped in.
"""

from __future__ import annotations

import json
import sys

from kvscope.cli import common, output

HELP = "multi-turn chat in the terminal, reusing the KV cache across turns"
PARENTS = ("model", "cache")


def add_arguments(p) -> None:
    p.add_argument("--history", choices=("keep", "truncate", "summarize"), default="keep",
                   help="what to do when the history grows: keep it (the policy evicts), truncate the oldest turns, "
                   "or summarize them with the model (default keep)")
    p.add_argument("--history-tokens", type=int, default=None,
                   help="token limit for truncate/summarize: prompt + new tokens (default: --budget)")
    p.add_argument("--system", default=None, help="system prompt")
    common.add_new_tokens(p, 256, "new tokens per reply at most")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep tokens up to this probability mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (a seeded chat repeats)")
    output.add_format(p)


def run(args) -> int:
    from kvscope.chat import ChatEngine
    from kvscope.errors import require_positive, usage
    from kvscope.runtime import Sampling

    common.check_policy_args(args)
    require_positive("--new-tokens", args.new_tokens, option="--new-tokens")
    if args.history_tokens is not None:
        require_positive("--history-tokens", args.history_tokens, option="--history-tokens")
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    loaded = common.load_model(args)
    if loaded.tokenizer is None:
        raise usage(f"{args.model} has no tokenizer, so it cannot chat", expected="a model directory with tokenizer "
                    "files, a .gguf, or smollm2-135m", fix="MODEL (python -m benchmarks.multiturn drives random-weight "
                    "shapes with token ids)")
    engine = ChatEngine(loaded.model, loaded.tokenizer, policy=common.policy_name(args), knobs=common.knobs(args),
                        session_budget=args.budget, kv_dtype=args.kv_dtype,
                        chunk_size=common.chunk_size(args), history=args.history,
                        history_tokens=args.history_tokens, recall=args.recall)
    chat = Conversation(engine, args.system, args.new_tokens, sampling, args.format)
    chat.check_one_turn_fits()
    return chat.loop(sys.stdin)


class Conversation:
    """The terminal side of one session: the messages so far, and what each command does."""

    def __init__(self, engine, system: str | None, max_new_tokens: int, sampling, fmt: str):
        self.engine, self.system, self.max_new_tokens, self.sampling, self.fmt = (engine, system, max_new_tokens,
                                                                                  sampling, fmt)
        self.session = engine.open()
        self.messages = self._start()

    def _start(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def check_one_turn_fits(self) -> None:
        """A budget that cannot hold even an empty message and the new tokens is a usage error, with the minimum."""
        from kvscope.errors import usage
        from kvscope.policies import get

        cfg = self.engine.config
        if get(cfg.policy).evicts:
            return
        empty = self.engine.renderer.count(self.messages + [{"role": "user", "content": ""}])
        need = empty + self.max_new_tokens - 1
        if need > cfg.budget_tokens:
            raise usage(f"--budget {cfg.budget_tokens} cannot hold one turn: the chat template alone takes {empty} "
                        f"tokens, plus --new-tokens {self.max_new_tokens} (the last never stored)",
                        expected=f"--budget of at least {need} under policy {cfg.policy!r}, more for real messages",
                        fix="--budget, --new-tokens, or an evicting --policy")

    def loop(self, stream) -> int:
        interactive = stream.isatty()
        if interactive and self.fmt == "table":
            output.stderr.print("[dim]/stats, /reset, /quit; a blank line does nothing[/dim]")
        while True:
            line = _read(stream, interactive)
            if line is None or line.strip() == "/quit":
                return 0
            text = line.strip()
            if not text:
                continue
            if text == "/reset":
                self.reset()
            elif text == "/stats":
                self.stats()
            elif text.startswith("/"):
                output.stderr.print(f"unknown command {text!r}: /stats, /reset or /quit", markup=False)
            else:
                self.turn(text)

    def reset(self) -> None:
        self.engine.reset(self.session.id)
        self.session = self.engine.open()
        self.messages = self._start()
        self._say({"event": "reset"}, "[dim]session reset: history and KV cache cleared[/dim]")

    def turn(self, text: str) -> None:
        from kvscope.chat.prompt import TextStream
        from kvscope.errors import KvscopeError

        messages = self.messages + [{"role": "user", "content": text}]
        stream = TextStream(self.engine.renderer)
        show = self.fmt == "table"

        def on_token(token: int) -> None:
            delta = stream.push(token)
            if show and delta:
                output.stdout.print(delta, end="", markup=False, highlight=False)

        try:
            r = self.engine.chat(self.session, messages, max_new_tokens=self.max_new_tokens, sampling=self.sampling,
                                 on_token=on_token)
        except KvscopeError as exc:  # the turn is not added: the history and the cache stay as they were
            text = exc.cli_message() if hasattr(exc, "cli_message") else str(exc)  # the CLI's flags, not parameters
            output.stderr.print(f"kvscope chat: error: {text}", markup=False)
            return
        if show:
            output.stdout.print(stream.finish(r.ids), markup=False, highlight=False)
        self.messages = messages + [{"role": "assistant", "content": r.text}]
        self._say({"event": "reply", **turn_fields(r)}, stats_line(r))

    def stats(self) -> None:
        s, c = self.session, self.session.counters
        snap = self.engine.store.snapshot()
        d = {"session": s.id, "turns": c.turns, "messages": len(self.messages), "cached_tokens": s.held_tokens(),
             "history_tokens": len(s.ids), "reused_tokens": c.reused_tokens, "computed_tokens": c.computed_tokens,
             "evicted_tokens": round(c.evicted_tokens, 1), "summaries": c.summaries, "rewinds": c.rewinds,
             "policy": s.config.policy, "budget_tokens": s.config.budget_tokens, "kv_bytes": snap.used_bytes}
        if self.fmt == "json":
            self._say({"event": "stats", **d}, "")
            return
        rows = [(k.replace("_", " "), output.gib(v) if k == "kv_bytes" else v) for k, v in d.items()]
        output.stdout.print(output.kv_table("session", rows))

    def _say(self, payload: dict, text: str) -> None:
        if self.fmt == "json":
            sys.stdout.write(json.dumps(payload) + "\n")
            sys.stdout.flush()
        elif text:
            output.stdout.print(text)


def turn_fields(r) -> dict:
    return {"text": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
            "cached_tokens": r.cached_tokens, "reused_tokens": r.reused_tokens, "computed_tokens": r.computed_tokens,
            "evicted_tokens": round(r.evicted_tokens, 1), "completion_tokens": r.completion_tokens,
            "first_token_seconds": round(r.first_token_seconds, 4),
            "decode_tokens_per_second": r.decode_tokens_per_second and round(r.decode_tokens_per_second, 2)}


def stats_line(r) -> str:
    tps = f"{r.decode_tokens_per_second:.1f} tok/s" if r.decode_tokens_per_second else "- tok/s"
    return (f"[dim]cached {r.cached_tokens} · reused {r.reused_tokens} · computed {r.computed_tokens} · "
            f"evicted {r.evicted_tokens:.0f} · first token {r.first_token_seconds:.2f} s · {tps}[/dim]")


def _read(stream, interactive: bool) -> str | None:
    if interactive:
        try:
            return output.stdout.input("[bold]you>[/bold] ")
        except EOFError:
            return None
    line = stream.readline()
    return line if line else None
