"""Versions, devices and settings, as a block to paste into a bug report."""

from __future__ import annotations

from kvscope.cli import output

HELP = "print versions and devices for a bug report; warns when transformers is outside the tested range"


def add_arguments(p) -> None:
    output.add_format(p)


def run(args) -> int:
    from kvscope.env import collect

    d = collect()
    output.emit(d, args.format, render)
    for warning in d["warnings"]:
        output.stderr.print(f"warning: {warning}", markup=False, highlight=False)
    return 0


def render(d: dict) -> None:
    lines = []
    for key, value in d.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"  - {item}" for item in value] or ["  (none)"]
        elif isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {v}" for k, v in value.items()]
        else:
            lines.append(f"{key}: {value}")
    output.stdout.print("\n".join(lines), highlight=False, markup=False)
