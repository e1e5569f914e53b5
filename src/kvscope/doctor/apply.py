"""Applying the best fix: re-run it under the same monitor and check the outcome against the fix's own estimate."""

from __future__ import annotations

from kvscope.doctor.diagnose import figure, workload_dict
from kvscope.doctor.execute import Outcome, execute
from kvscope.monitor import Monitor
from kvscope.planner.advice import Fix
from kvscope.planner.estimate import estimate
from kvscope.planner.sizes import format_bytes as fb
from kvscope.report.model import Check, Figure, FixOutcome, KVLayer

# a measured peak allocated further than this from the planner's peak for the fixed workload is reported as differing
# (the planner is within 1% on the points of docs/benchmarks.md; KV storage must agree to the byte)
PEAK_TOLERANCE = 0.05


def best_fix(fixes: list[Fix]) -> Fix | None:
    """The cheapest fix this machine can run and that is estimated to fit."""
    return next((f for f in fixes if f.applicable and f.fits), None)


def apply_fix(loaded, best: Fix, monitor: Monitor, *, capacity: int, progress=None) -> FixOutcome:
    """Re-run `best.workload` and return the fix outcome, with `check`: the measured figure against the estimate."""
    w = best.workload
    _requantize(loaded, w.weights)
    monitor.mark("fix", best.option)
    again = execute(loaded.model, loaded.spec, w, monitor=monitor, phase_prefix="fix: ", progress=progress)
    return FixOutcome(applied=f"{best.action} ({best.option})", option=best.option, command=best.command,
                      status=report_status(again.status), detail=again.status, error=again.error,
                      peak_allocated_bytes=again.peak_allocated_bytes, peak_rss_bytes=again.peak_rss_bytes,
                      kv_bytes=again.kv_bytes, evicted_tokens=again.evicted_tokens, seconds=round(again.seconds, 3),
                      failed_at=again.failed_at, workload=workload_dict(loaded.spec, w), kv_layers=again.kv_layers,
                      decode_tokens_per_second=again.decode_tokens_per_second,
                      check=check(best, again, loaded.spec, capacity))


def _requantize(loaded, weights: str | None) -> None:
    """A weight-format fix quantizes the loaded model's projections in place before the re-run (the dense weights are
    freed as each layer is replaced); the diagnosis of the dense run is on disk by then."""
    from kvscope.models.quantize import quantize, weights_format_of

    if weights is not None and weights_format_of(loaded.model) != weights:
        quantize(loaded.model, weights, str(next(loaded.model.parameters()).device))


def report_status(status: str) -> str:
    return {"ok": "ok", "oom": "oom"}.get(status, "error")


def check(best: Fix, again: Outcome, spec, capacity: int) -> Check:
    """Does the fixed run agree with what the fix promised? KV storage to the byte; a peak within PEAK_TOLERANCE;
    "nothing evicted" fixes evict nothing; and a fix that was said to fit runs."""
    if best.estimate_of == "KV storage":
        estimated, measured, what = best.estimate_bytes, again.kv_bytes, "KV storage"
        agrees = measured == estimated
    else:
        estimated = estimate(spec, best.workload, capacity).peak_bytes
        measured, what = again.peak_allocated_bytes, "peak allocated"
        agrees = measured is not None and abs(measured - estimated) <= PEAK_TOLERANCE * estimated
    problems = []
    if again.status != "ok":
        problems.append(f"the fixed run did not complete ({again.status})")
    if measured is not None and not agrees:
        problems.append(f"its measured {what} {fb(measured)} differs from the fix's estimate {fb(estimated)} "
                        f"({(measured - estimated) / estimated:+.1%})")
    if "nothing evicted" in best.message and again.evicted_tokens:
        problems.append(f"it said nothing would be evicted, but {again.evicted_tokens} tokens were")
    return Check(what, estimated, measured, not problems, problems)


def fix_figure(fix_outcome: FixOutcome) -> Figure:
    """The headline figure "needed by the applied fix": its estimate, with the measurement beside it."""
    c = fix_outcome.check
    measured = "-" if c.measured_bytes is None else fb(c.measured_bytes)
    verdict = "as estimated" if c.agrees else "DIFFERS from the estimate"
    return figure("needed by the applied fix", bytes_=c.estimate_bytes,
                  detail=f"{fix_outcome.option}: estimated {c.what}; measured {measured}, {verdict}")


def kv_layers(rows: list[dict]) -> list[KVLayer]:
    return [KVLayer(**row) for row in rows]
