"""Tests of the benchmark scripts (benchmarks/ is a package, run with `python -m benchmarks.<script>`)."""

import importlib


def load_benchmark(name: str):
    """benchmarks.<name>, imported as the scripts import each other."""
    return importlib.import_module(f"benchmarks.{name}")
