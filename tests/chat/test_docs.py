"""Every code block of docs/chat.md runs: the Python blocks in order (the client block against a real server on a
free port instead of port 8000), the piped chat command through bash, the serve command through the CLI's parser
(it would run until stopped)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from kvscope.cli.main import build_parser
from tests.serve.helpers import serving

DOC = Path(__file__).resolve().parents[2] / "docs" / "chat.md"
pytestmark = pytest.mark.slow


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(), re.S)


def test_python_blocks_run(smollm):
    model, tokenizer, _ = smollm
    library, client = blocks("python")
    namespace: dict = {}
    exec(compile(library, "docs/chat.md", "exec"), namespace)  # noqa: S102 - the document's own example
    with serving(model, tokenizer, name="smollm2-135m") as (server, _, _):
        exec(compile(client.replace("http://127.0.0.1:8000", server.url), "docs/chat.md", "exec"), {})


def test_shell_blocks_run_as_printed():
    serve, chat = blocks("bash")
    args = build_parser().parse_args(shlex.split(serve.strip())[1:])
    assert args.command == "serve" and args.budget == 2048 and args.total_budget == 16384
    out = subprocess.run(["bash", "-c", f"PATH={Path(__import__('sys').executable).parent}:$PATH; {chat}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    turns = re.findall(r"cached (\d+) · reused (\d+) · computed \d+ · evicted 0 · first token", out.stdout)
    assert len(turns) == 2 and "│ turns" in out.stdout
    assert int(turns[0][1]) == 0 and int(turns[1][1]) == int(turns[0][0])  # turn 2 reuses all that turn 1 cached
