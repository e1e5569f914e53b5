"""The largest batch, context or KV budget that fits: a search over the same model that `estimate` uses."""

from __future__ import annotations

from collections.abc import Callable

from kvscope.models.spec import ModelSpec
from kvscope.planner.estimate import fits, max_prompt
from kvscope.planner.workload import Workload


def largest(ok: Callable[[int], bool], lo: int, hi: int) -> int:
    """Largest n in [lo, hi] with ok(n), assuming ok is monotone (true then false); lo - 1 if none.

    Doubling from `lo` finds a bracket first, so a small answer costs a few calls, not log2(hi).
    """
    if hi < lo or not ok(lo):
        return lo - 1
    return _grow_then_bisect(ok, lo, hi)


def _grow_then_bisect(ok: Callable[[int], bool], good: int, hi: int) -> int:
    """From a known-good `good`, double the step until ok fails (or `hi`), then bisect the bracket."""
    step = 1
    while good + step <= hi and ok(good + step):
        good += step
        step *= 2
    return _bisect(ok, good, min(good + step, hi + 1))


def _bisect(ok: Callable[[int], bool], good: int, bad: int) -> int:
    """Largest n in [good, bad) with ok(n), given ok(good) and not ok(bad)."""
    while bad - good > 1:
        mid = (good + bad) // 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good


def max_batch(spec: ModelSpec, w: Workload, capacity: int, limit: int = 1 << 20) -> int:
    """Largest batch that fits with this context; 0 if even one sequence does not."""
    return largest(lambda b: fits(spec, w.with_(batch=b), capacity), 1, limit)


def max_context(spec: ModelSpec, w: Workload, capacity: int) -> int:
    """Largest prompt length that fits with this batch and new tokens; 0 if none."""
    hi = max_prompt(spec, w.new_tokens)
    return max(0, largest(lambda c: fits(spec, w.with_(context=c), capacity), 1, hi))


def max_budget(spec: ModelSpec, w: Workload, capacity: int) -> int:
    """Largest KV budget (tokens per sequence and layer) that fits under kvscope's runtime; 0 if none."""
    base = w.with_(runtime="kvscope")
    return max(0, largest(lambda n: fits(spec, base.with_(budget_tokens=n), capacity), 1, w.kv_tokens))


def largest_from(ok: Callable[[int], bool], start: int, lo: int = 1, hi: int = 1 << 20) -> int:
    """Largest n in [lo, hi] with ok(n), searched outward from a predicted `start`; lo - 1 if none.

    For measured searches (each call a real run): a good prediction costs about log2(|error|) + 2 runs, where
    halving blindly from hi would cost log2(hi). Assumes ok is monotone.
    """
    start = min(max(start, lo), hi)
    if ok(start):
        return _grow_then_bisect(ok, start, hi)
    bad, step = start, 1
    while bad - step >= lo and not ok(bad - step):
        bad -= step
        step *= 2
    if bad - step >= lo:
        return _bisect(ok, bad - step, bad)
    if bad == lo or not ok(lo):
        return lo - 1
    return _bisect(ok, lo, bad)
