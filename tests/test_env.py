"""The transformers range kvscope claims is the one it tests: README, pyproject, the Makefile's oldest pin and
`kvscope env` agree, and `kvscope env` warns outside it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvscope import env
from tests.cli.test_cli import run

ROOT = Path(__file__).resolve().parents[1]


def test_the_claimed_range_is_the_tested_range():
    oldest, newest = env.TRANSFORMERS_OLDEST, env.TRANSFORMERS_NEWEST
    minor = lambda v: ".".join(v.split(".")[:2])  # noqa: E731
    assert f"transformers {minor(oldest)} to {minor(newest)}" in (ROOT / "README.md").read_text()
    assert f"TRANSFORMERS_OLDEST := {oldest}" in (ROOT / "Makefile").read_text()
    cap = re.search(r'"transformers>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert cap.group(1) == minor(oldest)
    major, low = newest.split(".")[:2]
    assert cap.group(2) == f"{major}.{int(low) + 1}"  # the newest minor release allowed is the newest tested
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test\n" in ci and "make test-oldest" in ci


@pytest.mark.parametrize("version, warns", [("5.17.0", False), ("5.24.0", False), ("5.24.3", False),
                                            ("5.16.1", True), ("5.25.0", True), ("6.0.0", True)])
def test_env_warns_outside_the_range(version, warns):
    assert bool(env.version_warnings(version)) == warns


def test_env_command_warns(capsys, monkeypatch):
    monkeypatch.setattr(env, "_version", lambda name: "5.30.0" if name == "transformers" else "1.0")
    code, out, err = run(capsys, "env", "--format", "json")
    assert code == 0 and "transformers 5.30.0 is outside the range" in err
    assert json.loads(out)["warnings"] and "5.17.0 to 5.24.x" in json.loads(out)["supported_transformers"]


def test_this_environment_is_inside_the_range():
    assert env.version_warnings() == []
