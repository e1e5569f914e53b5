"""Run one workload under the monitor and say exactly what happened: completed, out of GPU memory, or over its KV
budget, with the memory figures taken at the moment of failure."""

from __future__ import annotations

import contextlib
import gc
import re
import time
from dataclasses import asdict, dataclass, field

import torch

from kvscope import _compat
from kvscope.cache import BudgetedCache, CacheFullError
from kvscope.monitor import Monitor, Phases
from kvscope.planner.workload import Workload, prefill_chunk
from kvscope.runtime import generate

_SIZE = r"([\d.]+) ([KMGT]i?B)"
_TRIED = re.compile(r"Tried to allocate " + _SIZE)
_BY_PYTORCH = re.compile(r"Of the allocated memory " + _SIZE + r" is allocated by PyTorch")
_UNALLOCATED = re.compile(r"and " + _SIZE + r" is reserved by PyTorch but unallocated")
_IN_USE = re.compile(r"this process has " + _SIZE + r" memory in use")
_UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


@dataclass
class AtFailure:
    """Memory at the moment of the OOM (read inside the except block, while the failed frames still hold their
    tensors)."""

    allocated: int
    reserved: int
    device_used: int | None
    tried_to_allocate: int | None
    kv_bytes: int


@dataclass
class Outcome:
    status: str  # "ok" | "oom" | "kv_budget_exceeded" | "error"
    error: str | None
    seconds: float
    peak_allocated_bytes: int | None
    peak_reserved_bytes: int | None
    peak_rss_bytes: int
    kv_bytes: int
    kv_layers: list[dict] = field(default_factory=list)
    evicted_tokens: int = 0
    at_failure: AtFailure | None = None
    decode_tokens_per_second: float | None = None
    failed_at: float | None = None  # seconds on the monitor's clock when the run failed
    failed_in: str | None = None  # the phase it failed in ("prefill chunk 1/2", "decode")
    held_tokens: int | None = None  # KV tokens per sequence the forward that failed would have left in the cache

    def to_dict(self) -> dict:
        return asdict(self)


def random_prompt(vocab: int, batch: int, context: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, context), generator=g).to(device)


def execute(model, spec, w: Workload, *, monitor: Monitor, snapshot_path: str | None = None, seed: int = 0,
            phase_prefix: str = "", progress=None) -> Outcome:
    """Run `w` once. The kvscope runtime uses a `BudgetedCache` (budget = `w.budget_tokens`, or the whole sequence:
    `w.kv_tokens`); the hf runtime is plain `generate()` with its default cache. `progress(phase, done, total)` is
    called as prefill chunks and decode steps complete (for a progress bar)."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    ids = random_prompt(spec.vocab_size, w.batch, w.context, device, seed)
    cache = None
    phases = _phases(w, monitor, phase_prefix, progress)
    monitor.sample()  # a short run may end between two background samples
    start, start_t = time.perf_counter(), monitor.now()
    outcome_status, error, at_failure, tps = "ok", None, None, None
    failed_at = failed_in = None
    try:
        if w.runtime == "hf":
            cache = _compat.dynamic_cache(model)
            _run_hf(model, ids, cache, w, phases)
        else:
            budget = w.budget_tokens or w.kv_tokens
            cache = BudgetedCache(model, w.cache_policy, budget_tokens=budget, kv_dtype=w.kv_dtype,
                                  chunk_size=w.chunk_size, recall=w.recall, **w.knobs)
            gen = _run_kvscope(model, ids, cache, w, phases, monitor)
            tps = gen.decode_tokens_per_second
    except torch.OutOfMemoryError as exc:
        failed_at, failed_in = monitor.now(), phases.current
        outcome_status, error = "oom", _first_line(exc)
        at_failure = _at_failure(exc, cache, device)
        _dump_snapshot(snapshot_path)
    except CacheFullError as exc:
        failed_at, failed_in = monitor.now(), phases.current
        outcome_status, error = "kv_budget_exceeded", str(exc)
    finally:
        monitor.sample()
        monitor.close_phases()
    seconds = time.perf_counter() - start
    stats = cache.stats() if isinstance(cache, BudgetedCache) else None  # one read of the device counters
    kv_layers, kv_bytes, evicted = _kv_figures(cache, stats)
    if stats is not None:
        monitor.record_kv(stats)
    rss = [r for t, r in zip(monitor.timeline.t, monitor.timeline.rss) if t >= start_t]
    peak_alloc = torch.cuda.max_memory_allocated(device) if cuda else None
    peak_res = torch.cuda.max_memory_reserved(device) if cuda else None
    out = Outcome(outcome_status, error, seconds, peak_alloc, peak_res, max(rss, default=0),
                  kv_bytes, kv_layers, evicted, at_failure, tps, failed_at, failed_in,
                  phases.tokens if failed_at is not None else None)
    del cache
    release(device)
    return out


def _phases(w: Workload, monitor: Monitor, prefix: str, progress) -> Phases:
    """The run's phases, marked on the monitor (names prefixed for the re-run after a fix) and shown as progress.
    kvscope's runtime prefills a large batch in shorter chunks than `chunk_size` (planner.workload.prefill_chunk)."""
    chunk = None if w.runtime == "hf" else prefill_chunk(w.batch, w.chunk_size)
    phases = Phases(w.context, w.new_tokens, chunk=chunk, batch=w.batch, on_progress=progress)
    monitor.follow(phases, prefix)
    return phases


def release(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _run_hf(model, ids, cache, w: Workload, phases: Phases) -> None:
    phases.begin()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=w.new_tokens,
                       min_new_tokens=w.new_tokens, do_sample=False, logits_processor=[phases.logits_processor()],
                       pad_token_id=0, **{_compat.cache_keyword(model): cache})


def _run_kvscope(model, ids, cache: BudgetedCache, w: Workload, phases: Phases, monitor: Monitor):
    """The cache's figures go on the timeline after every prefill chunk and every 8 decode steps."""
    def record(phase: str, done: int, total: int) -> None:
        if phase == "prefill" or done % 8 == 0:
            monitor.record_kv(cache.stats())

    phases.progress.append(record)
    phases.begin()
    # check_fit off: the doctor reproduces an overflow as it happens, to show where it strikes
    return generate(model, ids, cache, max_new_tokens=w.new_tokens, chunk_size=w.chunk_size, on_phase=phases,
                    check_fit=False)


def _kv_figures(cache, stats=None) -> tuple[list[dict], int, int]:
    """(per-layer rows, KV bytes, evicted tokens); `stats` saves a second read of a BudgetedCache's counters."""
    if cache is None:
        return [], 0, 0
    if isinstance(cache, BudgetedCache):
        s = stats or cache.stats()
        return ([{"layer": x.layer, "stored_tokens": x.stored_tokens, "evicted_tokens": x.evicted_tokens,
                  "bytes": x.bytes, "capacity_tokens": x.capacity_tokens} for x in s.layers], s.bytes,
                s.evicted_tokens)
    rows, total = [], 0
    for i, (k, v) in enumerate(_compat.dynamic_cache_tensors(cache)):
        n = (k.nbytes + v.nbytes) if k is not None and v is not None else 0
        tokens = k.shape[2] if k is not None and k.dim() == 4 else 0
        rows.append({"layer": i, "stored_tokens": tokens, "evicted_tokens": 0, "bytes": n, "capacity_tokens": tokens})
        total += n
    return rows, total, 0


def _size(pattern: re.Pattern, text: str) -> int | None:
    m = pattern.search(text)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


def _at_failure(exc, cache, device) -> AtFailure:
    """Memory at the failure. PyTorch's OOM message states it as of the failed allocation (rounded to 0.01 GiB);
    by the time the exception reaches us some temporaries are already freed, so the message wins where it has them."""
    text = str(exc)
    free, total = torch.cuda.mem_get_info(device)
    allocated = _size(_BY_PYTORCH, text)
    unallocated = _size(_UNALLOCATED, text)
    if allocated is None or unallocated is None:
        allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    else:
        reserved = allocated + unallocated
    return AtFailure(allocated=allocated, reserved=reserved, device_used=_size(_IN_USE, text) or total - free,
                     tried_to_allocate=_size(_TRIED, text), kv_bytes=_kv_figures(cache)[1])


def _dump_snapshot(path: str | None) -> None:
    if path is None:
        return
    with contextlib.suppress(Exception):  # a missing snapshot is reported, never fatal
        torch.cuda.memory._dump_snapshot(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.split("\n")[0][:2000]
