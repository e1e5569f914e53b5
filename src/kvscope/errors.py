"""Errors that reach users.

Every message says what was wrong (or needed), what was available or expected, and which option to change,
in the manner of vLLM's out-of-memory message. The CLI turns a `UsageError` into exit code 2 and one line of text;
it is a `ValueError` so that API callers can catch it the usual way.
"""

from __future__ import annotations


class KvscopeError(Exception):
    """Base class for errors kvscope raises on purpose."""


class UsageError(KvscopeError, ValueError):
    """Bad input from the user: a wrong name, size, path or combination of options."""


def usage(problem: str, *, expected: str | None = None, fix: str | None = None) -> UsageError:
    """Build a `UsageError` whose text reads: problem; expected ...; fix.

    >>> str(usage("unknown GPU 'H900'", expected="one of H100-80GB, A100-80GB", fix="--gpu or --gpu-memory"))
    "unknown GPU 'H900'; expected one of H100-80GB, A100-80GB; change --gpu or --gpu-memory"
    """
    parts = [problem]
    if expected:
        parts.append(f"expected {expected}")
    if fix:
        parts.append(f"change {fix}")
    return UsageError("; ".join(parts))


def require_positive(name: str, value: int | float, *, option: str | None = None) -> None:
    """Raise a `UsageError` unless `value` is a positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise usage(f"{name} must be a positive number, got {value!r}", fix=option or name)
