"""Knob validation shared by the policies (messages name the knob and the allowed range)."""

from __future__ import annotations

from kvscope.errors import usage


def non_negative_int(policy: str, knob: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise usage(f"policy {policy!r}: {knob} must be a whole number >= 0, got {value!r}", fix=knob)


def positive_int(policy: str, knob: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise usage(f"policy {policy!r}: {knob} must be a whole number >= 1, got {value!r}", fix=knob)


def fraction(policy: str, knob: str, value, *, closed: bool = False) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and (0 <= value <= 1 if closed else 0 <= value < 1)
    if not ok:
        raise usage(f"policy {policy!r}: {knob} must be a fraction in [0, 1{']' if closed else ')'}, got {value!r}",
                    fix=knob)
