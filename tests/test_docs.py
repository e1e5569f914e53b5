"""Every code block of the README and docs/*.md runs as written, every `kvscope ...` command they show parses with the
real parsers, and every docstring example in src/kvscope runs (doctest)."""

from __future__ import annotations

import doctest
import importlib
import os
import re
import shlex
import warnings
from pathlib import Path

import pytest
import torch

from kvscope.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Python blocks that need a GPU, by (file, index among its python blocks), and why they cannot run here; they run on
# the GPU machine (pytest --gpu). None at present: the README's and docs/cache.md's blocks run on the CPU (the
# embedded model), and offload (CUDA only) is described in prose, not in a block.
GPU_ONLY: dict[tuple[str, int], str] = {}
# blocks that talk to a running server: tests/chat/test_docs.py runs them against a real one on a free port
NEEDS_SERVER = {("chat.md", 1): "the OpenAI client block needs `kvscope serve` running (tests/chat/test_docs.py)"}
# modules whose import needs Triton (a GPU-machine package); their docstrings have no runnable examples
NEEDS_TRITON = "_triton"  # the suffix of the modules that import Triton (kvscope.cache.fused loads them on CUDA only)
# placeholders the docs write in commands, and a value of the right type for parsing them
PLACEHOLDERS = {"MODEL": "smollm2-135m", "B": "8", "C": "512", "N": "16", "...": "text", "NAME": "H100-80GB",
                "SIZE": "24GiB", "DIR": "out"}


def python_blocks() -> list[tuple[str, int, str]]:
    out = []
    for path in DOCS:
        blocks = re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
        out += [(path.name, i, code) for i, code in enumerate(blocks)]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name, index, code", python_blocks(), ids=lambda v: str(v)[:24])
def test_python_block_runs_as_written(name, index, code, tmp_path, monkeypatch):
    if (name, index) in GPU_ONLY and not torch.cuda.is_available():
        pytest.skip(GPU_ONLY[(name, index)])
    if (name, index) in NEEDS_SERVER:
        pytest.skip(NEEDS_SERVER[(name, index)])
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, f"{name}[python {index}]", "exec"), {"__name__": "__docs__"})  # noqa: S102
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
                    and "past_key_values" in str(w.message)]
    assert not deprecations  # the cache goes in under the keyword this transformers wants


def command_lines() -> list[tuple[str, str]]:
    """`kvscope ...` lines of code blocks ("$ kvscope ..." or "kvscope ..."): commands shown to be run."""
    found = []
    for path in DOCS:
        for block in re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), re.S):
            for line in block.splitlines():
                line = line.strip().removeprefix("$ ").split("  #")[0].split(" # ")[0].strip()
                if line.startswith("kvscope "):
                    found.append((path.name, line))
    return found


def inline_mentions() -> list[tuple[str, str]]:
    """Inline `kvscope <command> ...` in the prose (names of commands, sometimes with some of their options)."""
    found = []
    for path in DOCS:
        outside = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        found += [(path.name, c) for c in re.findall(r"`(kvscope [a-z]+[^`]*)`", outside)]
    return found


@pytest.mark.parametrize("name, command", command_lines(), ids=lambda v: str(v)[:60])
def test_documented_command_parses(name, command):
    words = [PLACEHOLDERS.get(w, w) for w in shlex.split(command)[1:]]
    try:
        build_parser().parse_args(words)
    except SystemExit as exc:
        pytest.fail(f"{name}: `{command}` does not parse (exit {exc.code})")


@pytest.mark.parametrize("name, mention", inline_mentions(), ids=lambda v: str(v)[:60])
def test_inline_mentions_name_real_commands_and_options(name, mention):
    """A mention in prose may leave out required arguments, but every command and option it names exists."""
    from kvscope.cli.main import COMMANDS, command_parser

    words = shlex.split(mention)[1:]
    if words[0] not in COMMANDS:
        return  # prose such as "kvscope bf16" (a row name in a table), not a command
    options = {o for a in command_parser(words[0])._actions for o in a.option_strings}
    missing = [w for w in words if w.startswith("--") and w.split("=")[0] not in options]
    assert not missing, f"{name}: `{mention}` names {missing}, which `kvscope {words[0]}` does not have"


def _modules() -> list[str]:
    src = ROOT / "src"
    names = []
    for f in sorted((src / "kvscope").rglob("*.py")):
        name = ".".join(f.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        if not name.endswith(NEEDS_TRITON) and name != "kvscope.__main__":  # importing it runs the CLI
            names.append(name)
    return names


@pytest.mark.parametrize("module", _modules())
def test_docstring_examples_run(module):
    mod = importlib.import_module(module)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    cwd = os.getcwd()
    try:
        for test in finder.find(mod, module):
            runner.run(test)
    finally:
        os.chdir(cwd)
    assert runner.failures == 0, f"{module}: {runner.failures} docstring example(s) failed"
