"""A background sampler of memory and CPU/GPU use, with phase markers and KV-cache events.

Samples (every `interval` seconds, on a daemon thread): torch.cuda allocated / reserved / peak, device-wide used
memory (cudaMemGetInfo, which is what NVML reports as used) and utilization when pynvml is installed, process RSS and
CPU percent. Phases (`with monitor.phase("prefill")`, `mark(...)`, or `follow(phases)` for a generation's own
`kvscope.monitor.Phases`) and KV events (`record_kv(stats)`) are stamped on the same clock. Reading torch's counters
does not synchronise the GPU, so sampling does not slow the run.
"""

from __future__ import annotations

import contextlib
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil
import torch


@dataclass
class PhaseMark:
    name: str
    start: float
    end: float | None = None
    detail: str = ""


@dataclass
class Timeline:
    t: list[float] = field(default_factory=list)
    allocated: list[int] = field(default_factory=list)
    reserved: list[int] = field(default_factory=list)
    peak: list[int] = field(default_factory=list)
    device_used: list[int] = field(default_factory=list)
    gpu_util: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    cpu_percent: list[float] = field(default_factory=list)


def _nvml_handle(device_index: int):
    try:
        import pynvml  # optional: utilization only

        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(device_index)
    except Exception:  # noqa: BLE001 - any failure means "no utilization figures"
        return None, None


class Monitor:
    def __init__(self, interval: float = 0.05, device: int | None = None):
        self.interval = interval
        self.cuda = torch.cuda.is_available() and device is not None
        self.device = device
        self.timeline = Timeline()
        self.phases: list[PhaseMark] = []
        self.kv_events: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()
        self._t0 = time.perf_counter()
        self._nvml, self._handle = _nvml_handle(device) if self.cuda else (None, None)

    def now(self) -> float:
        return time.perf_counter() - self._t0

    # --- sampling --------------------------------------------------------------------------------------------------
    def sample(self) -> None:
        tl = self.timeline
        tl.t.append(round(self.now(), 4))
        tl.rss.append(self._process.memory_info().rss)
        tl.cpu_percent.append(self._process.cpu_percent(None))
        if self.cuda:
            tl.allocated.append(torch.cuda.memory_allocated(self.device))
            tl.reserved.append(torch.cuda.memory_reserved(self.device))
            tl.peak.append(torch.cuda.max_memory_allocated(self.device))
            free, total = torch.cuda.mem_get_info(self.device)
            tl.device_used.append(total - free)
            if self._handle is not None:
                tl.gpu_util.append(float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))

    def _loop(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a failed sample (e.g. during an OOM) is skipped, not fatal
                continue

    def start(self) -> Monitor:
        self._process.cpu_percent(None)
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="kvscope-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with contextlib.suppress(Exception):  # a last sample is nice to have, never fatal
            self.sample()

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- phases and events -----------------------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str, detail: str = ""):
        mark = self.mark(name, detail)
        try:
            yield mark
        finally:
            mark.end = self.now()

    def mark(self, name: str, detail: str = "") -> PhaseMark:
        """Start a phase now (the previous open one ends here)."""
        now = self.now()
        if self.phases and self.phases[-1].end is None:
            self.phases[-1].end = now
        m = PhaseMark(name, now, None, detail)
        self.phases.append(m)
        return m

    def follow(self, phases, prefix: str = "") -> None:
        """Mark every phase a `kvscope.monitor.Phases` starts (names prefixed with `prefix`)."""
        phases.starts.append(lambda name, detail: self.mark(prefix + name, detail))

    def close_phases(self) -> None:
        for p in self.phases:
            if p.end is None:
                p.end = self.now()

    def record_kv(self, stats) -> None:
        """Stamp a `CacheStats` snapshot (stored and evicted tokens) on the timeline."""
        self.kv_events.append({"t": round(self.now(), 4), "evicted_tokens": stats.evicted_tokens,
                               "stored_tokens": stats.stored_tokens, "bytes": stats.bytes})

    def to_dict(self) -> dict:
        self.close_phases()
        tl = self.timeline
        return {
            "timeline": {"t": tl.t, "allocated": tl.allocated, "reserved": tl.reserved, "peak": tl.peak,
                         "nvml_used": tl.device_used or None, "gpu_util": tl.gpu_util or None, "rss": tl.rss,
                         "cpu_percent": tl.cpu_percent},
            "phases": [{"name": p.name, "start": round(p.start, 4), "end": round(p.end, 4), "detail": p.detail}
                       for p in self.phases],
            "evictions": {"t": [e["t"] for e in self.kv_events],
                          "evicted_tokens": [e["evicted_tokens"] for e in self.kv_events]},
        }
