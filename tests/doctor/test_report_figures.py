"""The doctor's figures, to the number: phases, the failure's moment, one token count, labelled figures, fixes sized
as the cache allocates and checked against their outcome, commands that run as printed, files and exit codes."""

from __future__ import annotations

import json
import shlex

import pytest

from kvscope.cli.main import build_parser, main
from kvscope.doctor.apply import check
from kvscope.doctor.diagnose import fixes_for_budget
from kvscope.doctor.execute import execute
from kvscope.models.spec import ModelSpec
from kvscope.monitor import Monitor
from kvscope.planner.memory import kv_store_bytes
from kvscope.planner.workload import Workload
from tests.conftest import TINY, build_tiny

# head_dim 64, so int4 can store it: 2 layers x 1 KV head, fp32 KV = 1024 B/token, int8 272, int4 144 + a
# 131,072-byte full-precision window
TINY64 = {**TINY, "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
          "max_position_embeddings": 4096}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny64_dir(tmp_path):
    build_tiny(TINY64).save_pretrained(tmp_path / "tiny64")
    return tmp_path / "tiny64"


def doctor(capsys, model_dir, out, *extra):
    code, out_text, err = run(capsys, "doctor", model_dir, "--device", "cpu", "--out", out, "--format", "json", *extra)
    return code, (json.loads(out_text) if out_text.strip() else None), err


OVERFLOW = ["--batch", "2", "--context", "60", "--new-tokens", "6", "--runtime", "kvscope", "--policy", "full",
            "--budget", "24", "--chunk-size", "16"]


def test_phase_marks_name_the_chunk_that_starts():
    model = build_tiny()
    spec = ModelSpec.from_hf_config(TINY, name="tiny")
    w = Workload(batch=1, context=60, new_tokens=4, dtype="fp32", runtime="kvscope", chunk_size=16)
    with Monitor() as monitor:
        o = execute(model, spec, w, monitor=monitor)
    assert o.status == "ok"
    assert [(p.name, p.detail) for p in monitor.phases] == [
        ("prefill", "chunk 1/4"), ("prefill", "chunk 2/4"), ("prefill", "chunk 3/4"), ("prefill", "chunk 4/4"),
        ("decode", "4 new tokens: the first from prefill, then 3 forwards")]


def test_an_overflow_is_told_with_one_token_count_and_labelled_figures(capsys, tiny_model_dir, tmp_path):
    code, d, err = doctor(capsys, tiny_model_dir, tmp_path / "r", *OVERFLOW)
    assert code == 3, err  # failed, and no fix was applied
    o, diag = d["outcome"], d["diagnosis"]
    assert d["workload"]["kv_tokens"] == 65  # 60 + 6 - 1
    assert "needs 65 KV tokens" in diag["headline"] and "= 65 KV tokens" in diag["explanation"]
    assert "66" not in diag["explanation"] and "needs 32 KV tokens" not in o["error"]
    # chunk 1 (16 tokens) fits the 24-token budget; chunk 2 brings layer 0 to 32
    assert "had to hold 32 KV tokens per sequence in prefill chunk 2/4" in o["error"] and "needs 65" in o["error"]
    assert [f["label"] for f in diag["figures"]] == ["needed by the workload", "available", "held at the failure"]
    assert [f["tokens"] for f in diag["figures"]] == [65, 24, 32]
    spec = ModelSpec.from_config_file(tiny_model_dir)
    w = Workload(batch=2, context=60, new_tokens=6, dtype="fp32", runtime="kvscope", budget_tokens=24, chunk_size=16,
                 policy="full")
    assert diag["figures"][0]["bytes"] == kv_store_bytes(spec, w.with_(budget_tokens=65))
    assert diag["figures"][1]["bytes"] == kv_store_bytes(spec, w)
    assert o["failed_in"] == "prefill chunk 2/4" and o["held_tokens"] == 32
    assert 0 < o["failed_at"] <= d["phases"][-1]["end"]
    assert d["fix_outcome"] is None and not any("fix" in f["label"] for f in diag["figures"])


def test_the_fix_figure_is_the_applied_fix_and_is_checked(capsys, tiny_model_dir, tmp_path):
    code, d, err = doctor(capsys, tiny_model_dir, tmp_path / "r", *OVERFLOW, "--fix")
    assert code == 0, err  # fixed
    fo = d["fix_outcome"]
    applied = next(f for f in d["fixes"] if fo["option"] == f["option"])
    fig = d["diagnosis"]["figures"][-1]
    assert fig["label"] == "needed by the applied fix" and fig["bytes"] == applied["estimate_bytes"]
    assert fig["bytes"] != d["diagnosis"]["figures"][0]["bytes"]  # not the original workload's need
    assert fo["check"]["agrees"] and fo["check"]["measured_bytes"] == fo["check"]["estimate_bytes"] == fo["kv_bytes"]
    fix_start = next(p["start"] for p in d["phases"] if p["name"] == "fix")
    assert d["outcome"]["failed_at"] < fix_start  # the failure happened before the fix re-run, and says so
    # the KV chart shows the fixed run, in that run's own units
    assert d["kv_layers_workload"]["budget_tokens"] == fo["workload"]["budget_tokens"]


def test_int4_same_bytes_counts_its_full_precision_window(capsys, tiny64_dir, tmp_path):
    """int8 cannot hold the 1201 tokens in what a 300-token fp32 budget allocates (a policy that never evicts has no
    slots above its budget); int4 can, once its 131,072-byte window is counted as the planner counts it. The fixed run
    measures the estimate."""
    spec = ModelSpec.from_config_file(tiny64_dir)
    w = Workload(batch=1, context=1200, new_tokens=2, dtype="fp32", runtime="kvscope", budget_tokens=300,
                 chunk_size=64, policy="full")
    fixes = fixes_for_budget(spec, w)  # w.policy is "full"
    assert fixes[0].option == "--kv-dtype int4 --budget 1201"
    assert fixes[0].estimate_bytes == kv_store_bytes(spec, fixes[0].workload) == 1201 * 144 + 131_072
    assert fixes[0].estimate_bytes <= kv_store_bytes(spec, w) == 300 * 1024 < 1201 * 272  # int4 fits, int8 does not
    code, d, err = doctor(capsys, tiny64_dir, tmp_path / "r", "--batch", "1", "--context", "1200", "--new-tokens",
                          "2", "--runtime", "kvscope", "--budget", "300", "--chunk-size", "64", "--fix")
    assert code == 0, err
    fo = d["fix_outcome"]
    assert fo["option"] == "--kv-dtype int4 --budget 1201" and fo["evicted_tokens"] == 0
    assert fo["kv_bytes"] == fixes[0].estimate_bytes and fo["check"]["agrees"]


def test_a_fix_whose_outcome_differs_from_its_estimate_is_flagged(tiny_model_dir):
    from kvscope.doctor.execute import Outcome

    spec = ModelSpec.from_config_file(tiny_model_dir)
    w = Workload(batch=1, context=60, new_tokens=2, dtype="fp32", runtime="kvscope", budget_tokens=24, chunk_size=16)
    fix = fixes_for_budget(spec, w.with_(policy="full"))[-1]  # raise the budget: "nothing evicted"
    again = Outcome("ok", None, 1.0, None, None, 0, kv_bytes=fix.estimate_bytes * 3, evicted_tokens=5)
    c = check(fix, again, spec, 0)
    assert not c.agrees and len(c.problems) == 2
    assert "differs from the fix's estimate" in c.problems[0] and "5 tokens were" in c.problems[1]


def test_every_doctor_fix_runs_as_printed(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    code, d, err = doctor(capsys, tiny_model_dir, out, *OVERFLOW)
    assert code == 3, err
    for fix in d["fixes"]:
        ns = build_parser().parse_args(shlex.split(fix["command"])[1:])
        assert ns.command == "doctor" and ns.out != str(out)  # a new --out: pasting it never hits "not empty"
        for field, value in fix["changes"].items():
            assert getattr(ns, {"budget_tokens": "budget"}.get(field, field)) == value, (fix["command"], field)
    first = shlex.split(d["fixes"][0]["command"])[1:]
    code, fixed, err = (lambda r: (r[0], json.loads(r[1]), r[2]))(run(capsys, *first, "--format", "json"))
    assert code == 0 and fixed["outcome"]["status"] == "ok", err


def test_doctor_plan_fixes_are_doctor_or_plan_commands(capsys, tiny_model_dir, tmp_path):
    """On the CPU a GPU-memory fix cannot be applied, but it is still printed as a command that runs: a larger GPU
    as --gpu-memory of its size, tensor parallelism as the `kvscope plan` that checks it."""
    code, d, err = doctor(capsys, tiny_model_dir, tmp_path / "r", "--batch", "64", "--context", "900",
                          "--new-tokens", "2", "--gpu-memory", "900MiB")
    assert code == 0, err  # on the CPU it ran (nothing but the planner said it would not fit the 900 MiB)
    assert d["fixes"] and all(not f["applicable"] for f in d["fixes"])
    for fix in d["fixes"]:
        words = shlex.split(fix["command"])
        ns = build_parser().parse_args(words[1:])
        assert ns.command in ("doctor", "plan") and "--gpu" not in words
        if ns.command == "plan":
            code, out, err = run(capsys, *words[1:], "--format", "json", "--check")
            assert code == 0, (fix["command"], err)


def test_out_must_be_empty_unless_forced_and_runs_never_mix(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    assert doctor(capsys, tiny_model_dir, out, *OVERFLOW)[0] == 3
    (out / "memory_snapshot.pickle").write_bytes(b"an earlier run's snapshot")
    code, d, err = doctor(capsys, tiny_model_dir, out, *OVERFLOW)
    assert code == 2 and "is not empty" in err and "--force" in err
    assert (out / "memory_snapshot.pickle").exists()  # refused: nothing touched
    code, d, err = doctor(capsys, tiny_model_dir, out, *OVERFLOW, "--force")
    assert code == 3, err
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]  # the stale snapshot is gone


def test_ctrl_c_during_the_fix_rerun_keeps_the_diagnosis(capsys, tiny_model_dir, tmp_path, monkeypatch):
    import importlib

    doctor_module = importlib.import_module("kvscope.doctor.doctor")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(doctor_module, "apply_fix", interrupted)
    out = tmp_path / "r"
    code, _, err = run(capsys, "doctor", tiny_model_dir, "--device", "cpu", "--out", out, *OVERFLOW, "--fix")
    assert code == 130 and "interrupted" in err
    saved = json.loads((out / "report.json").read_text())
    assert "KV budget exceeded" in saved["diagnosis"]["headline"] and saved["fix_outcome"] is None
    assert any("interrupted (Ctrl-C)" in n for n in saved["notes"])
    assert (out / "report.html").exists()


def test_doctor_exit_codes(capsys, tiny_model_dir, tmp_path):
    ok = ["--batch", "1", "--context", "20", "--new-tokens", "2"]
    assert doctor(capsys, tiny_model_dir, tmp_path / "a", *ok)[0] == 0
    assert doctor(capsys, tiny_model_dir, tmp_path / "b", *OVERFLOW)[0] == 3
    assert doctor(capsys, tiny_model_dir, tmp_path / "c", *OVERFLOW, "--fix")[0] == 0


def test_a_cpu_kv_cache_beyond_host_memory_is_refused_before_it_is_allocated(capsys, tiny_model_dir, tmp_path):
    code, _, err = run(capsys, "doctor", tiny_model_dir, "--device", "cpu", "--batch", "4096", "--context", "8",
                       "--new-tokens", "2", "--runtime", "kvscope", "--budget", "1000000000", "--out", tmp_path / "r")
    assert code == 3 and "would allocate" in err and "available" in err
    assert not (tmp_path / "r").exists()


def test_a_chunked_eviction_fix_comes_with_recall_first_and_its_host_cost(tiny_model_dir):
    """A prompt longer than one chunk: the eviction fix would choose before the question is seen, so the doctor
    offers it with the recall tier first, naming the host memory the tier can take (the planner's, to the byte)."""
    from kvscope.planner.memory import recall_host_bytes
    from kvscope.planner.sizes import format_bytes

    spec = ModelSpec.from_config_file(tiny_model_dir)
    w = Workload(batch=1, context=600, new_tokens=2, dtype="fp32", runtime="kvscope", budget_tokens=64,
                 chunk_size=128, policy="full")
    options = [f.option for f in fixes_for_budget(spec, w)]
    recall = next(i for i, o in enumerate(options) if o.endswith("--recall cpu"))
    plain = options.index(options[recall].removesuffix(" --recall cpu"))
    assert recall < plain
    fix = fixes_for_budget(spec, w)[recall]
    assert fix.workload.recall == "cpu" and format_bytes(recall_host_bytes(spec, fix.workload)) in fix.message
    one_chunk = w.with_(chunk_size=1024)  # the whole prompt in one forward: nothing to recall
    assert not any(f.option.endswith("--recall cpu") for f in fixes_for_budget(spec, one_chunk))
