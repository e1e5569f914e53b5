"""Errors that reach users, and the exit codes the CLI gives them.

Every message says what was wrong (or needed), what was available or expected, and which option to change,
in the manner of vLLM's out-of-memory message. A message is written once, naming the CLI's options (`--context`);
a library caller reads it naming the Python parameters instead (`context`), the CLI names the flags:

>>> err = usage("context 9000 + 128 new tokens is too long", fix="--context or --new-tokens")
>>> str(err)                      # what `kvscope.plan(...)` raises
'context 9000 + 128 new tokens is too long; change context or new_tokens'
>>> err.cli_message()             # what `kvscope plan ...` prints
'context 9000 + 128 new tokens is too long; change --context or --new-tokens'

Exit codes of `kvscope` (README, "Exit codes"): 0 the command ran (or the doctor's fix worked), 1 kvscope's own
failure, 2 a usage error, 3 the workload does not fit (`plan --check`, an OOM or KV budget overflow not fixed).
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_DOES_NOT_FIT = 3

# every flag of the CLI (a test checks this against the real parsers) and the two that library messages of the cache
# and the runtime use for their own parameters; other double-dash words (`pip install --no-deps`) are left alone
CLI_FLAGS = frozenset({
    "--batch", "--budget", "--chat", "--check", "--chunk-size", "--context", "--device", "--dimension", "--dtype",
    "--fix", "--force", "--format", "--gpu", "--gpu-memory", "--help", "--kv-dtype", "--new-tokens", "--no-warmup",
    "--nvtx", "--out", "--policy", "--policy-knob", "--prompt", "--prompt-file", "--random-weights", "--raw",
    "--runtime", "--top", "--tp", "--warmup", "--weights",
    # watch and advise (advise takes some of the engines' own flag names, so that its advice reads as theirs)
    "--duration", "--interval", "--timeout", "--chunked-prefill-size", "--concurrency", "--engine", "--engine-version",
    "--from-log", "--gpu-memory-utilization", "--max-model-len", "--max-num-batched-tokens", "--mem-fraction-static",
    "--no-cuda-graphs", "--offline",
    # chat and serve
    "--history", "--history-tokens", "--system", "--temperature", "--top-p", "--top-k", "--seed", "--host", "--port",
    "--served-model-name", "--total-budget", "--total-budget-bytes", "--max-waiting", "--max-sessions", "--swap-space",
    "--shutdown-timeout", "--recall"})
_LIBRARY_FLAGS = frozenset({"--offload", "--max-new-tokens"})
# flags whose Python parameter is not the flag's own name with dashes turned into underscores
_PARAMETERS = {"--budget": "budget_tokens", "--no-warmup": "warmup=False"}
# switches (no value): the Python parameter takes True
_SWITCHES = {"--random-weights", "--fix", "--force", "--nvtx", "--check", "--raw", "--chat", "--warmup", "--offload",
             "--no-cuda-graphs", "--offline"}
# the word after a flag is its value only if it is one of the CLI's choices, a number or size, or a placeholder
# (N, SIZE); anything else is prose ("--budget or --policy", "--gpu-memory was given")
_VALUES = {"hf", "kvscope", "bf16", "fp16", "fp32", "fp8", "int8", "int4", "auto", "cpu", "cuda", "batch", "context",
           "table", "json", "full", "h2o", "knorm", "lru", "random", "sliding_window", "snapkv", "streaming_llm",
           "tova"}
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?:([ =])([A-Za-z0-9_.:+=-]+))?")
_NUMBER = re.compile(r"^-?[0-9][0-9_.]*([KMGT]i?B|B)?$")
# phrases the CLI has a concrete option for
_CLI_PHRASES = {"the policy's knobs": "--policy-knob NAME=VALUE"}
# a fix that starts with one of these reads as an instruction ("drop --nvtx"), not as an option to change
_VERBS = {"add", "drop", "pass", "use", "set", "give", "run", "install", "remove", "pick", "choose", "lower", "raise",
          "check", "free", "delete", "move"}


class KvscopeError(Exception):
    """Base class for errors kvscope raises on purpose."""


class _TwoForms(KvscopeError):
    """A message kept in the CLI's words: `str()` names Python parameters (the library's form), `cli_message()` the
    CLI's flags."""

    def __init__(self, message: str):
        super().__init__(message)
        self.cli_text = message

    def __str__(self) -> str:
        return python_form(self.cli_text)

    def cli_message(self) -> str:
        return cli_form(self.cli_text)


class UsageError(_TwoForms, ValueError):
    """Bad input from the user: a wrong name, size, path or combination of options (CLI exit code 2)."""


class DoesNotFit(_TwoForms):
    """The workload does not fit (out of memory, a KV budget outgrown, nothing found that runs): CLI exit code 3."""


def _parameter(match: re.Match) -> str:
    flag, sep, value = match.group(1), match.group(2), match.group(3)
    if flag not in CLI_FLAGS and flag not in _LIBRARY_FLAGS:
        return match.group(0)
    name = _PARAMETERS.get(flag, flag[2:].replace("-", "_"))
    if flag in _SWITCHES:
        out = name if "=" in name else f"{name}=True"
        return out + (f"{sep}{value}" if value else "")
    if flag == "--policy-knob":  # a knob is a keyword argument of its own
        return value if value and "=" in value else "the policy's knobs" + (f"{sep}{value}" if value else "")
    if value is not None and _NUMBER.match(value):
        return f"{name}={value}" if value[-1].isdigit() else f"{name}={value!r}"  # a size ("24GiB") is text
    if value is not None and value.isupper():  # a placeholder (N, SIZE)
        return f"{name}={value}"
    if value is not None and (value in _VALUES or value.startswith("cuda:")):
        return f"{name}={value!r}"
    return name + (f"{sep}{value}" if value else "")


def python_form(text: str) -> str:
    """`text` with each CLI flag turned into the Python parameter it stands for (`--new-tokens 8` -> `new_tokens=8`)."""
    text = text.replace("the MODEL argument", "the model argument")
    text = re.sub(r"(?<![\w-])MODEL(?![\w-])", "model", text)
    return _FLAG.sub(_parameter, text)


def cli_form(text: str) -> str:
    """`text` as the CLI prints it: phrases that stand for a CLI option name that option."""
    for phrase, option in _CLI_PHRASES.items():
        text = text.replace(phrase, option)
    return text


def usage(problem: str, *, expected: str | None = None, fix: str | None = None) -> UsageError:
    """Build a `UsageError` whose text reads: problem; expected ...; change <fix> (or the fix itself, when it is an
    instruction such as "drop --nvtx"). Write options as CLI flags: `str()` turns them into Python parameters.

    >>> usage("unknown GPU 'H900'", expected="one of H100-80GB, A100-80GB", fix="--gpu or --gpu-memory").cli_message()
    "unknown GPU 'H900'; expected one of H100-80GB, A100-80GB; change --gpu or --gpu-memory"
    >>> usage("--nvtx needs CUDA", fix="drop --nvtx").cli_message()
    '--nvtx needs CUDA; drop --nvtx'
    """
    return UsageError(_compose(problem, expected, fix))


def does_not_fit(problem: str, *, expected: str | None = None, fix: str | None = None) -> DoesNotFit:
    """Like `usage`, for a workload that does not fit (exit code 3)."""
    return DoesNotFit(_compose(problem, expected, fix))


def _compose(problem: str, expected: str | None, fix: str | None) -> str:
    parts = [problem]
    if expected:
        parts.append(f"expected {expected}")
    if fix:
        first = fix.split(maxsplit=1)[0].lower() if fix.strip() else ""
        parts.append(fix if first in _VERBS or first == "change" else f"change {fix}")
    return "; ".join(parts)


def require_positive(name: str, value: int | float, *, option: str | None = None) -> None:
    """Raise a `UsageError` unless `value` is a positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise usage(f"{name} must be a positive number, got {value!r}", fix=option or name)
