"""Entry point: `kvscope <command> [options]` and `python -m kvscope`.

A `UsageError` becomes one line on stderr and exit code 2; so do argparse's own errors. A workload that does not fit
(`DoesNotFit`, a KV budget the `full` policy outgrew) is exit code 3. Anything unexpected becomes a one-line internal
error with a pointer to `kvscope env` (set KVSCOPE_DEBUG=1 for the traceback), exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from kvscope import __version__
from kvscope.cli import common
from kvscope.errors import EXIT_DOES_NOT_FIT, EXIT_INTERNAL, EXIT_USAGE, DoesNotFit, KvscopeError, UsageError

COMMANDS = ("plan", "run", "doctor", "fit", "profile", "chat", "serve", "watch", "advise", "env")
EXIT_CODES = """exit codes:
  0  the command ran (for doctor: the workload ran, or the applied fix made it run)
  1  kvscope's own failure (an internal error)
  2  usage error: a bad option, name, size or file
  3  the workload does not fit: plan --check, an OOM or KV budget overflow that was not fixed, fit found nothing"""


def build_parser() -> argparse.ArgumentParser:
    """The real parser of every command. Abbreviations are off: `--gpu` must never silently mean `--gpu-memory`."""
    parser = argparse.ArgumentParser(prog="kvscope", allow_abbrev=False, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Find, explain and fix KV-cache OOMs and slowdowns for Llama 3 "
                                     "family models.")
    parser.add_argument("--version", action="version", version=f"kvscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"kvscope.cli.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__, allow_abbrev=False,
                           epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
                           parents=common.parents(getattr(module, "PARENTS", ())))
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one command, as `build_parser()` builds it (for rendering and checking command lines)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse's own usage errors (exit 2) and --help/--version (exit 0)
        return int(exc.code or 0)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return _run(args)


def _run(args) -> int:
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        print(f"kvscope {args.command}: error: {exc.cli_message()}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kvscope: interrupted", file=sys.stderr)
        return 130
    except DoesNotFit as exc:
        print(f"kvscope {args.command}: does not fit: {exc.cli_message()}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    except KvscopeError as exc:
        if _is_cache_full(exc):  # the `full` policy outgrew its --budget
            print(f"kvscope {args.command}: does not fit: {exc}", file=sys.stderr)
            return EXIT_DOES_NOT_FIT
        print(f"kvscope {args.command}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    except Exception as exc:  # noqa: BLE001 - the last line of defence against raw tracebacks
        if os.environ.get("KVSCOPE_DEBUG"):
            raise
        print(f"kvscope {args.command}: internal error: {type(exc).__name__}: {exc}\n"
              "Please report it with the output of `kvscope env` (KVSCOPE_DEBUG=1 shows the traceback).",
              file=sys.stderr)
        return EXIT_INTERNAL


def _is_cache_full(exc: Exception) -> bool:
    layer = sys.modules.get("kvscope.cache.layer")  # not imported: no cache ran (and `plan` never imports torch)
    return layer is not None and isinstance(exc, layer.CacheFullError)


if __name__ == "__main__":
    sys.exit(main())
