"""Parse and print memory sizes ("24GiB", "80 GB", "1.5TiB", "1073741824B"). Text needs a unit; an int is bytes."""

from __future__ import annotations

import re

from kvscope.errors import usage

_UNITS = {
    "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float, *, option: str = "--gpu-memory") -> int:
    """Bytes in a size string; decimal units (GB) are powers of 1000, binary units (GiB) of 1024. Text without a
    unit is refused ("80" could be GB, GiB or bytes); a Python int or float is a number of bytes.

    >>> parse_size("24GiB")
    25769803776
    >>> parse_size("80 GB")
    80000000000
    >>> parse_size(1024)
    1024
    """
    if isinstance(text, bool):
        raise usage(f"malformed size {text!r}", expected="a number with a unit such as 24GiB or 80GB", fix=option)
    if isinstance(text, (int, float)):
        value, unit = float(text), "b"
    else:
        match = _SIZE.match(str(text))
        if match and not match.group(2):
            n = match.group(1)
            raise usage(f"size {text!r} has no unit", expected=f"a number with a unit, such as {n}GiB, {n}GB or "
                        f"{n}B (bytes)", fix=option)
        if not match or match.group(2).lower() not in _UNITS:
            raise usage(f"malformed size {text!r}", expected="a number with a unit such as 24GiB, 80GB or 512MiB",
                        fix=option)
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise usage(f"size must be positive, got {text!r}", expected="a size such as 24GiB", fix=option)
    return size


def format_bytes(n: int | float) -> str:
    """Binary units with two decimals: 16060522496 -> '14.96 GiB'."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError
