"""kvscope's own generation loop: chunked prefill into a preallocated cache, then decode.

Why not only `model.generate()`: `generate` prefills the whole prompt in one forward, so activations and logits scale
with the prompt even when the cache is bounded. Here the prompt goes through the model `chunk_size` tokens at a time
and only the last position's logits are computed, so the peak is weights + cache (budget + one chunk) + one chunk of
activations, whatever the prompt length. Phases are reported to an optional callback (the monitor marks them).

A cache that already holds tokens is continued: the new tokens take the positions after each row's newest, so a chat
turn prefills only what was added since the last one (kvscope.chat).

Decode never waits for the GPU at every step: each step's ids are copied to the host asynchronously and read while
the next step runs, so stop tokens, stop strings and the `on_token` callback see them one step late, and a finished
batch costs at most one extra step.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvscope import _compat
from kvscope.cache.streams import side_stream
from kvscope.errors import usage
from kvscope.planner.workload import DEFAULT_CHUNK, PREFILL_TOKENS, prefill_chunk
from kvscope.runtime.decoders import make_decoder
from kvscope.runtime.sampling import Sampling
from kvscope.runtime.stops import StopRule, Stops

PhaseCallback = Callable[[str, int, int], None]  # (phase, done, total)
TokenCallback = Callable[[int, list[int]], bool | None]  # (step, one id per row, done rows too) -> True to stop


@dataclass
class Generation:
    sequences: torch.Tensor  # [B, new_tokens] generated ids; after a row's stop: its stop token, then zeros
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    first_token_logits: torch.Tensor | None = field(default=None, repr=False)
    lengths: list[int] = field(default_factory=list)  # per row: tokens before its stop token (all, without a stop)
    finish_reasons: list[str] = field(default_factory=list)  # per row: "stop" or "length"
    first_token_seconds: float | None = None  # time to the first new token (prefill + its pick)
    fed_tokens: int = 0  # new tokens that went into the cache: all but the last, or all when a stop was seen late

    # A stop is seen one step late, so the token that stopped a batch has been fed back by then: the cache holds the
    # prompt plus `fed_tokens` new tokens (kvscope.chat relies on knowing exactly what the cache holds).

    @property
    def decode_tokens_per_second(self) -> float | None:
        steps = self.new_tokens - 1  # the first new token comes out of prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else None

    def row(self, i: int) -> list[int]:
        """Row i's generated ids, without its stop token or anything after it."""
        return self.sequences[i, :self.lengths[i]].tolist()


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """True positions for left-padded rows: real tokens count from 0; pads get 0 (they are never stored)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def driver_oom_as_oom(fn):
    """`fn`, with a CUDA driver allocation that fails raised as `torch.OutOfMemoryError`. Memory outside PyTorch's
    allocator (a stream, a CUDA graph, a kernel's module, a cuBLAS workspace) that a full GPU cannot give comes out as
    `AcceleratorError: CUDA error: out of memory`; for every caller (the doctor, `kvscope run`, the server) it is the
    same fault as an allocator OOM, and is handled as one."""
    driver_error = getattr(torch, "AcceleratorError", None)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:
            if driver_error is None or not isinstance(exc, driver_error) or "out of memory" not in str(exc):
                raise
            first = str(exc).splitlines()[0]
            raise torch.OutOfMemoryError(f"{first} (a CUDA driver allocation, outside PyTorch's allocator)") from exc

    return wrapper


@driver_oom_as_oom
@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, cache, *, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 32, chunk_size: int = DEFAULT_CHUNK, eos_token_id: int | list[int] | None = None,
             stop_strings: list[str] | None = None, tokenizer=None, sampling: Sampling | None = None,
             on_phase: PhaseCallback | None = None, on_token: TokenCallback | None = None,
             keep_first_logits: bool = False, check_fit: bool = True, decode: str = "auto",
             prefill_tokens: int = PREFILL_TOKENS) -> Generation:
    """Generate up to `max_new_tokens` per row after `input_ids` [B, n] (left-padded when `attention_mask` says so).

    `cache` is any transformers Cache (a `BudgetedCache` normally); when it already holds tokens, `input_ids` are the
    tokens added since, and generation continues from there. `sampling` is greedy by default. `check_fit` refuses,
    before any work, a request that a non-evicting `BudgetedCache` cannot hold (the doctor turns it off to watch the
    overflow happen). The prompt goes in chunks of `chunk_size` tokens per sequence, shorter for a large batch so that
    one forward holds at most `prefill_tokens` tokens. `decode`: "auto" (on CUDA, kvscope's own step captured in CUDA
    graphs when the model and cache allow it; the model's forward otherwise), "graph", "static" or "forward"
    (kvscope.runtime.decoders).

    >>> gen = generate(model, ids, BudgetedCache(model, "lru", budget_tokens=256), max_new_tokens=16)  # doctest: +SKIP
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise usage("the prompt is empty", expected="at least one token", fix="input_ids (--prompt)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise usage(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}",
                    fix="max_new_tokens (--new-tokens)")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise usage(f"chunk_size must be a whole number >= 1, got {chunk_size!r}", fix="chunk_size (--chunk-size)")
    sampling = sampling or Sampling()
    rule = StopRule(frozenset(_as_list(eos_token_id)), tuple(stop_strings or ()), tokenizer)
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    mask = (attention_mask if attention_mask is not None else torch.ones_like(ids)).to(device)
    if check_fit and hasattr(cache, "check_request"):
        cache.check_request(int(mask.sum(-1).max()), max_new_tokens)
    chunk_size = prefill_chunk(ids.shape[0], chunk_size, prefill_tokens)
    side_stream(device)  # CUDA memory the decode step needs outside PyTorch's allocator: before the cache fills it
    if hasattr(cache, "allocate"):  # the whole cache, before any activation exists (kvscope.cache.arena)
        cache.allocate(ids.shape[0], min(chunk_size, ids.shape[1]), next(model.parameters()).dtype, device)
    positions = positions_from_mask(mask) + _next_positions(cache, ids.shape[0], device)[:, None]
    key = _compat.cache_keyword(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = ids.shape[1]
    budgeted = hasattr(cache, "check_request")  # a BudgetedCache keeps its own mask: it reads only the new columns
    seen = 0 if budgeted or cache is None else int(cache.get_seq_length())
    if seen:  # another cache continued: its mask covers the history too
        mask = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, seen), mask], dim=1)

    start = time.perf_counter()
    logits = None
    if hasattr(cache, "begin_prefill"):
        cache.begin_prefill(n, ids.shape[0], next(model.parameters()).dtype)
    try:
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            if e == n and hasattr(cache, "last_prefill_forward"):
                cache.last_prefill_forward()
            out = model(input_ids=ids[:, s:e], attention_mask=mask[:, s:e] if budgeted else mask[:, :seen + e],
                        position_ids=positions[:, s:e], use_cache=True, logits_to_keep=1, **{key: cache})
            logits = out.logits[:, -1]
            if on_phase:
                on_phase("prefill", e, n)
    finally:  # the recall tier lives for one prefill, also when it fails
        if hasattr(cache, "end_prefill"):
            cache.end_prefill()
    first = logits.float().clone() if keep_first_logits else None
    pick = sampling.picker(device)
    nxt = pick(logits)
    sync()
    prefill_s = time.perf_counter() - start

    stops = Stops(ids.shape[0], rule)
    watch = rule.active or on_token is not None
    host = _HostTokens(max_new_tokens, ids.shape[0], device) if watch else None
    tokens = []
    decoder = make_decoder(model, cache, positions[:, -1:] + 1, None if budgeted else mask, decode)
    stopped = False
    start = time.perf_counter()
    try:
        for step in range(max_new_tokens):
            tokens.append(nxt)
            if host is not None:
                host.put(step, nxt)
                if step and _read(host, step - 1, stops, on_token):
                    stopped = True
                    break
            if step == max_new_tokens - 1:
                break
            nxt = pick(decoder.step(nxt))
            if on_phase:
                on_phase("decode", step + 1, max_new_tokens)
    finally:
        decoder.finish()
    if host is not None and not stopped:  # the last step is still unread
        _read(host, len(tokens) - 1, stops, on_token)
    sync()
    decode_s = time.perf_counter() - start
    seq = torch.stack(tokens, dim=1)
    if host is not None:
        seq = seq[:, :stops.steps]  # the step made while the host read the one that said stop is dropped
    lengths = stops.lengths() if host is not None else [seq.shape[1]] * seq.shape[0]
    seq = _pad_after_stop(seq, lengths)
    return Generation(sequences=seq, prompt_tokens=n, new_tokens=seq.shape[1], prefill_seconds=prefill_s,
                      decode_seconds=decode_s, first_token_logits=first, lengths=lengths,
                      finish_reasons=stops.reasons() if host is not None else ["length"] * seq.shape[0],
                      first_token_seconds=prefill_s, fed_tokens=seq.shape[1] if stopped else seq.shape[1] - 1)


class _HostTokens:
    """Each step's ids copied to (pinned) host memory without waiting; read back one step later."""

    def __init__(self, steps: int, batch: int, device):
        cuda = device.type == "cuda"
        self.buffer = torch.empty(steps, batch, dtype=torch.long, pin_memory=cuda)
        self.events = [torch.cuda.Event() for _ in range(steps)] if cuda else None

    def put(self, step: int, ids: torch.Tensor) -> None:
        self.buffer[step].copy_(ids, non_blocking=self.events is not None)
        if self.events is not None:
            self.events[step].record()

    def get(self, step: int) -> list[int]:
        if self.events is not None:
            self.events[step].synchronize()
        return self.buffer[step].tolist()


def _read(host: _HostTokens, step: int, stops: Stops, on_token: TokenCallback | None) -> bool:
    """Feed step `step`'s ids to the stop rules and the callback; True when generation should end."""
    ids = host.get(step)
    stops.feed(ids)
    stop = bool(on_token(step, ids)) if on_token is not None else False
    return stop or (stops.rule.active and stops.all_done)


def _pad_after_stop(seq: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Keep each row's tokens and its stop token; zeros after (what `Generation.sequences` promises)."""
    if all(n >= seq.shape[1] for n in lengths):
        return seq
    keep = torch.tensor([n + 1 for n in lengths], device=seq.device)[:, None]
    return torch.where(torch.arange(seq.shape[1], device=seq.device)[None] < keep, seq, torch.zeros_like(seq))


def _next_positions(cache, batch: int, device) -> torch.Tensor:
    """[B] the position each row's next token takes: after what the cache holds (0 for an empty cache)."""
    if hasattr(cache, "next_positions"):
        return cache.next_positions(batch, device)
    seen = cache.get_seq_length() if cache is not None else 0
    return torch.full((batch,), int(seen), dtype=torch.long, device=device)


def _as_list(eos) -> list[int]:
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple, set, frozenset)) else [eos])]
