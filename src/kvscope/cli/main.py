"""Entry point: `kvscope <command> [options]` and `python -m kvscope`.

A `UsageError` becomes one line on stderr and exit code 2; so do argparse's own errors. Anything unexpected becomes a
one-line internal error with a pointer to `kvscope env` (set KVSCOPE_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from kvscope import __version__
from kvscope.errors import KvscopeError, UsageError

COMMANDS = ("plan", "run", "doctor", "fit", "profile", "chat", "serve", "env")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvscope", description="Find, explain and fix KV-cache OOMs and slowdowns "
                                     "for Llama 3 family models.")
    parser.add_argument("--version", action="version", version=f"kvscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"kvscope.cli.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse's own usage errors (exit 2) and --help/--version (exit 0)
        return int(exc.code or 0)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        print(f"kvscope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvscope: interrupted", file=sys.stderr)
        return 130
    except KvscopeError as exc:
        print(f"kvscope {args.command}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the last line of defence against raw tracebacks
        if os.environ.get("KVSCOPE_DEBUG"):
            raise
        print(f"kvscope {args.command}: internal error: {type(exc).__name__}: {exc}\n"
              "Please report it with the output of `kvscope env` (KVSCOPE_DEBUG=1 shows the traceback).",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
