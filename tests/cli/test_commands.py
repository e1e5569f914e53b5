"""Every command kvscope prints runs as printed: each one is parsed back with the real parsers (`build_parser()`),
and the cheap ones are run. Options have one name across commands, help text, and no abbreviations."""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import pytest

from kvscope.cli.main import COMMANDS, build_parser, command_parser, main
from kvscope.errors import CLI_FLAGS
from tests.cli.test_cli import run

SRC = Path(__file__).resolve().parents[2] / "src" / "kvscope"
# double-dash words in kvscope's source that are not its own CLI flags, and why
NOT_OURS = {
    "--bg", "--error", "--fg", "--line", "--muted", "--ok", "--oom", "--panel",  # CSS variables of the report
    "--logdir", "--no-deps", "--version",  # tensorboard's, pip's; the top-level parser's own --version
    "--no-",  # argparse's prefix of a BooleanOptionalAction (cli/commands.py)
    # library-only messages: BudgetedCache(offload=True) and generate()/profile_workload(max_new_tokens=) raise them
    # from the Python API, which reads them as parameters; the CLI checks --new-tokens before calling either
    "--offload", "--max-new-tokens",
}


def parse(command: str):
    words = shlex.split(command)
    assert words[0] == "kvscope", command
    return build_parser().parse_args(words[1:])


def test_abbreviations_are_off():
    for argv in (["doctor", "m", "--batch", "1", "--context", "8", "--new-tokens", "2", "--gpu", "T4"],
                 ["plan", "llama-3-8b", "--batc", "8"], ["plan", "llama-3-8b", "--new", "8"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(argv)
        assert exc.value.code == 2


def test_doctor_gpu_is_not_taken_for_gpu_memory(capsys):
    code, _, err = run(capsys, "doctor", "smollm2-135m", "--batch", "1", "--context", "8", "--new-tokens", "2",
                       "--gpu", "T4")
    assert code == 2 and "unrecognized arguments: --gpu T4" in err and "malformed size" not in err


def test_every_option_has_help_and_one_name_across_commands():
    flags = set()
    for name in COMMANDS:
        for action in command_parser(name)._actions:
            flags.update(action.option_strings)
            if action.dest in ("help", "command"):
                continue
            assert action.help and action.help.strip(), f"kvscope {name} {action.option_strings or action.dest}"
    assert "--max-new-tokens" not in flags
    for name in ("plan", "run", "doctor", "fit", "profile"):
        assert "--new-tokens" in {o for a in command_parser(name)._actions for o in a.option_strings}, name
    device = {name: next(a for a in command_parser(name)._actions if "--device" in a.option_strings)
              for name in ("run", "doctor", "fit", "profile")}
    assert len({a.type for a in device.values()}) == 1  # the same validated --device everywhere


def test_the_translation_table_knows_every_cli_flag():
    flags = {o for name in COMMANDS for a in command_parser(name)._actions for o in a.option_strings
             if o.startswith("--")}
    assert flags == set(CLI_FLAGS)


def test_every_flag_named_in_the_source_exists():
    """No message names a flag that no command has (the old "drop --offload", "change --context" in `run`)."""
    unknown = {}
    for f in SRC.rglob("*.py"):
        if f.parent.name == "engines" or f.name == "advise.py":  # vLLM's and SGLang's own flags, in their advice
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for m in re.finditer(r"(?<![\w-])--[a-z][a-z0-9-]*", node.value):
                    if m.group(0) not in CLI_FLAGS and m.group(0) not in NOT_OURS:
                        unknown.setdefault(m.group(0), []).append(f.name)
    assert not unknown


def test_no_fix_reads_change_plus_a_verb():
    """`usage(fix="drop --x")` used to print "change drop --x"; every fix given in the source renders cleanly."""
    from kvscope.errors import usage

    bad = []
    for f in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "fix" and isinstance(node.value, ast.Constant):
                text = usage("x", fix=node.value.value).cli_message()
                if re.search(r"change (pass|drop|add|use|give|run|install|set|remove|pick|choose) ", text):
                    bad.append((f.name, text))
    assert not bad


PLANS = [
    ["plan", "llama-3-8b", "--batch", "64", "--context", "8000", "--new-tokens", "16"],
    ["plan", "llama-3.1-70b", "--gpu", "A100-80GB", "--context", "32768", "--batch", "4"],
    ["plan", "llama-3-8b", "--gpu-memory", "24GiB", "--batch", "8", "--context", "4000"],
    ["plan", "llama-3-8b", "--runtime", "kvscope", "--gpu-memory", "20GiB", "--batch", "32", "--context", "8000",
     "--chunk-size", "256"],
    ["plan", "smollm2-135m", "--gpu-memory", "1GiB", "--batch", "64", "--context", "4096", "--dtype", "fp32"],
]


@pytest.mark.parametrize("argv", PLANS)
def test_plan_fixes_run_as_printed_and_fit(capsys, argv):
    code, out, err = run(capsys, *argv, "--format", "json")
    assert code == 0, err
    advice = json.loads(out)["advice"]
    assert advice
    for fix in advice:
        ns = parse(fix["command"])
        for field, value in fix["changes"].items():
            assert getattr(ns, {"budget_tokens": "budget"}.get(field, field)) == value, (fix["command"], field)
        code, out, err = run(capsys, *shlex.split(fix["command"])[1:], "--format", "json", "--check")
        assert code == 0, (fix["command"], err)  # --check: 0 means it fits, as the fix said
        assert json.loads(out)["fits"] is True


def test_plan_check_exit_codes(capsys):
    assert run(capsys, "plan", "llama-3-8b", "--batch", "64", "--context", "8000", "--check")[0] == 3
    assert run(capsys, "plan", "llama-3-8b", "--batch", "1", "--context", "8000", "--check")[0] == 0
    assert run(capsys, "plan", "llama-3-8b", "--batch", "64", "--context", "8000")[0] == 0  # a prediction ran


def test_plan_table_prints_each_fix_as_a_command(capsys):
    code, out, _ = run(capsys, *PLANS[0])
    assert code == 0
    commands = [line.split(". ", 1)[1] for line in out.splitlines() if re.match(r"\s+\d+\. kvscope plan ", line)]
    assert commands and all(parse(c).command == "plan" for c in commands)


def test_plan_refuses_cache_options_under_hf(capsys):
    code, _, err = run(capsys, "plan", "llama-3-8b", "--chunk-size", "128")
    assert code == 2 and "--chunk-size configures kvscope's cache, but --runtime is hf" in err


def test_plan_policy_is_checked_against_the_budget(capsys):
    code, _, err = run(capsys, "plan", "llama-3-8b", "--runtime", "kvscope", "--budget", "16", "--policy", "snapkv")
    assert code == 2 and "below the minimum of policy 'snapkv'" in err
    assert "change --budget or --policy-knob NAME=VALUE" in err  # was "the policy's knobs", with no option behind it
    code, _, err = run(capsys, "plan", "llama-3-8b", "--runtime", "kvscope", "--budget", "16", "--policy", "snapkv",
                       "--policy-knob", "window=8")
    assert code == 0, err


def test_main_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "3  the workload does not fit" in capsys.readouterr().out
    assert main(["doctor", "--help"]) == 0
