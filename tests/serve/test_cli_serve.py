"""`kvscope serve` bad input: exit code 2 and one line naming the option, before the model loads where it can."""

from __future__ import annotations

import socket

import pytest

from kvscope.cli.main import main
from tests.chat.models import tiny_chat_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_chat_model):
    return tiny_chat_dir(tmp_path_factory.mktemp("tiny-chat"))


def run(capsys, *argv):
    code = main(["serve", *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, fragment", [
    (["--policy", "lfu"], "unknown policy 'lfu'"),
    (["--policy", "snapkv", "--budget", "8"], "below the minimum of policy 'snapkv'"),
    (["--total-budget-bytes", "12XB"], "malformed size '12XB'"),
    (["--port", "70000"], "port 70000 is out of range"),
    (["--max-waiting", "0"], "--max-waiting must be a positive number"),
    (["--history", "forget"], "invalid choice: 'forget'"),
    (["--budget", "1024", "--total-budget", "600"], "one session needs 1024 KV slots"),
])
def test_bad_input_exits_2_with_one_line(capsys, model_dir, argv, fragment):
    code, err = run(capsys, str(model_dir), "--port", "0", *argv) if "--port" not in argv else \
        run(capsys, str(model_dir), *argv)
    assert code == 2 and fragment in err.strip().splitlines()[-1] and "Traceback" not in err
    if "invalid choice" not in fragment:  # argparse's own errors come after its usage text
        assert len(err.strip().splitlines()) == 1


def test_a_port_in_use_is_a_usage_error(capsys, model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        code, err = run(capsys, str(model_dir), "--port", str(taken.getsockname()[1]))
    assert code == 2 and "cannot listen on 127.0.0.1" in err and "change --host or --port" in err
