"""Rendering shared by commands: one payload, shown as a rich table or as JSON; progress on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.table import Table

from kvscope.planner.sizes import format_bytes

FORMATS = ("table", "json")

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)


def add_format(parser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="table", help="output as a table (default) or JSON")


def emit(payload: dict[str, Any], fmt: str, render: Callable[[dict[str, Any]], None]) -> None:
    if fmt == "json":
        sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    else:
        render(payload)


def kv_table(title: str, rows: Iterable[tuple[str, Any]]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, str(v))
    return t


def gib(n: int | float | None) -> str:
    return "-" if n is None else format_bytes(n)


@contextmanager
def status(message: str, enabled: bool = True):
    """A spinner on stderr for steps that take more than a moment (never on stdout, which may be JSON)."""
    if not enabled or not sys.stderr.isatty():
        yield
        return
    with stderr.status(message):
        yield


def progress(enabled: bool = True):
    """A rich progress bar on stderr, or a no-op object when stderr is not a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=stderr, disable=not enabled or not sys.stderr.isatty(), transient=True)
