"""`kvscope chat` driven through piped stdin, and its bad input: exit code 2, one line, the option to change."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from kvscope.cli.main import main
from tests.chat.models import tiny_chat_dir

SCRIPT = "My order 7781 is late.\n/stats\nWhat was the order number?\n/what\n/reset\nHello\n/quit\nnever read\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_chat_model):
    return tiny_chat_dir(tmp_path_factory.mktemp("tiny-chat"))


def chat(*argv, stdin: str):
    return subprocess.run([sys.executable, "-m", "kvscope", "chat", *argv], input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_piped_chat_shows_reuse_after_each_reply(model_dir):
    # the embedded model runs the same way in tests/chat/test_docs.py (docs/chat.md's command)
    out = chat(str(model_dir), "--new-tokens", "12", "--budget", "512", "--chunk-size", "64",
               "--system", "You are a support agent.", stdin=SCRIPT)
    assert out.returncode == 0, out.stderr
    lines = re.findall(r"cached (\d+) · reused (\d+) · computed (\d+) · evicted (\d+) · first token [\d.]+ s · "
                       r"[\d.-]+ tok/s", out.stdout)
    assert len(lines) == 3  # two turns, then one after /reset
    (c1, r1, p1, _), (c2, r2, p2, _), (_, r3, _, _) = [tuple(map(int, x)) for x in lines]
    assert r1 == 0 and r2 == c1 and p2 > 0  # turn 2 reused all that turn 1 left in the cache
    assert r3 == 0  # /reset cleared the session
    assert "│ turns           │ 1" in out.stdout and "session reset" in out.stdout
    assert "unknown command '/what'" in out.stderr and "Traceback" not in out.stderr


def test_json_lines_and_a_turn_too_long_keeps_the_session(model_dir):
    out = chat(str(model_dir), "--format", "json", "--new-tokens", "4", "--budget", "120", "--chunk-size", "32",
               stdin="hi\n" + "word " * 150 + "\nhi again\n/stats\n")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert [e["event"] for e in events] == ["reply", "reply", "stats"]
    first, second, stats = events
    assert second["reused_tokens"] > 0 and stats["turns"] == 2  # the refused turn left the history as it was
    assert "its budget is 120 under policy 'full'" in out.stderr and "change --budget" in out.stderr


@pytest.mark.parametrize("argv, fragment", [
    (["--history", "forget"], "invalid choice: 'forget'"),
    (["--policy", "lfu"], "unknown policy 'lfu'"),
    (["--policy", "snapkv", "--budget", "8"], "below the minimum of policy 'snapkv'"),
    (["--budget", "0"], "--budget must be a positive number"),
    (["--history-tokens", "-5"], "--history-tokens must be a positive number"),
    (["--temperature", "-1"], "temperature must be a number in [0, 100]"),
])
def test_bad_options_exit_2_before_the_model_loads(capsys, model_dir, argv, fragment):
    code = main(["chat", str(model_dir), *argv])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err


def test_a_budget_too_small_for_one_turn_says_the_minimum(capsys, model_dir):
    code = main(["chat", str(model_dir), "--budget", "20", "--new-tokens", "16"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(r"--budget 20 cannot hold one turn: the chat template alone takes \d+ tokens.*--budget of at "
                     r"least \d+", err)
