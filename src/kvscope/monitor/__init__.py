"""Monitoring: a background memory/CPU/GPU sampler with phase markers, and a live-tensor tracer for tests."""

from kvscope.monitor.sampler import Monitor, PhaseMark, Timeline

__all__ = ["Monitor", "PhaseMark", "Timeline"]
