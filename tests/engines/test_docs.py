"""Every `kvscope` command in docs/engines.md's bash blocks and in the README rows for engines runs as printed
(watch against the local test server, whose address replaces 127.0.0.1:8000)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from kvscope.cli.main import main
from tests.engines.engine_metrics import State

ROOT = Path(__file__).resolve().parents[2]


def doc_commands() -> list[str]:
    text = (ROOT / "docs" / "engines.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("kvscope ")]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [c for c in re.findall(r"`(kvscope (?:watch|advise) [^`]*)`", text)]


def busy(n: int) -> State:
    return State(kv_usage=0.93, running=12, waiting=3, preemptions=4 * n, prefix_queries=30_000 * n,
                 prefix_hits=20_000 * n, ttft=[0.4] * n)


@pytest.mark.parametrize("command", doc_commands() + readme_commands())
def test_command_runs_as_printed(command, metrics_server, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs name fixture logs relative to the repository root
    if " watch " in f" {command} ":
        server = metrics_server("vllm", busy)
        command = command.replace("127.0.0.1:8000", server.url.split("//")[1].split("/")[0])
    code = main(shlex.split(command)[1:])
    _, err = capsys.readouterr()
    assert code == 0, err


def test_the_docs_have_commands():
    assert len(doc_commands()) >= 6 and len(readme_commands()) == 2
