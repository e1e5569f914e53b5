"""Monitoring: a background memory/CPU/GPU sampler with phase markers, the one source of a generation's phases, and a
live-tensor tracer for tests."""

from kvscope.monitor.phases import Phases
from kvscope.monitor.sampler import Monitor, PhaseMark, Timeline

__all__ = ["Monitor", "PhaseMark", "Phases", "Timeline"]
