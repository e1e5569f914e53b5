"""Command lines that kvscope prints (fixes, the command a report came from), rendered from a parsed namespace by the
command's own parser, so that each one runs as printed (tests parse every one back with `build_parser()`).

>>> from kvscope.cli.main import command_parser
>>> args = command_parser("plan").parse_args(["llama-3-8b", "--batch", "64"])
>>> render("plan", args, batch=27)
'kvscope plan llama-3-8b --batch 27'
"""

from __future__ import annotations

import argparse
import copy
import shlex
from typing import Any

MIB = 1024**2
# Workload fields whose CLI option has another name
_DESTS = {"budget_tokens": "budget"}
# what a command line says first, after the model: the workload's size
_FIRST = ("--batch", "--context", "--new-tokens", "--prompt", "--prompt-file")


def render(command: str, args: argparse.Namespace, **changes: Any) -> str:
    """`kvscope <command> ...` for `args` with `changes` (option dests -> values) applied; options at their default
    are left out."""
    from kvscope.cli.main import command_parser

    ns = copy.copy(args)
    for dest, value in changes.items():
        setattr(ns, dest, value)
    words = ["kvscope", command]
    actions = command_parser(command)._actions
    for action in sorted(actions, key=_place):
        words += _words(action, getattr(ns, action.dest, action.default))
    return shlex.join(words)


def _place(action: argparse.Action) -> int:
    """Positionals first, then the workload's size, then every other option in the parser's order."""
    if not action.option_strings:
        return 0
    return 1 if action.option_strings[0] in _FIRST else 2


def _words(action: argparse.Action, value: Any) -> list[str]:
    if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action.dest.startswith("_"):
        return []
    if not action.option_strings:  # a positional
        return [str(value)]
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        if value == action.default or value is None:
            return []
        return [flag if value else next(s for s in action.option_strings if s.startswith("--no-"))]
    if isinstance(action, argparse._StoreConstAction):  # store_true / store_false share this base
        return [flag] if value == action.const and value != action.default else []
    if isinstance(action, argparse._AppendAction):
        return [w for item in value or [] for w in (flag, _text(item))]
    if value is None or value == action.default:
        return []
    return [flag, _text(value)]


def _text(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2:  # a NAME=VALUE pair (--policy-knob)
        return f"{value[0]}={value[1]}"
    return str(value)


def dests(changes: dict[str, Any]) -> dict[str, Any]:
    """A fix's Workload-field changes as option dests (`budget_tokens` -> `budget`)."""
    return {_DESTS.get(k, k): v for k, v in changes.items()}


def size_text(n: int) -> str:
    """A byte count as `--gpu-memory` reads it back exactly."""
    return f"{n // MIB}MiB" if n % MIB == 0 else f"{n}B"
