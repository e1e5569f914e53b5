"""`kvscope advise`: the engines' flags with their reasons, refusals in the engine's words, and --from-log."""

from __future__ import annotations

import json
import shlex

import pytest

from kvscope.cli.main import main
from kvscope.engines import logs
from kvscope.errors import UsageError
from tests.engines.conftest import FIXTURES


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def advise_json(capsys, *argv):
    code, out, err = run(capsys, "advise", *argv, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def flags_of(command: str) -> dict[str, str]:
    words = shlex.split(command)
    return {w: words[i + 1] for i, w in enumerate(words) if w.startswith("--") and i + 1 < len(words)}


def test_vllm_target_that_fits_gives_flags_and_a_pinned_alternative(capsys):
    d = advise_json(capsys, "--engine", "vllm", "llama-3.1-8b", "--gpu", "H100-80GB", "--max-model-len", "32768",
                    "--concurrency", "8")
    assert d["fits"] is True and d["refusal"] is None and d["fixes"] == []
    assert d["needed_tokens"] == 8 * 32768 <= d["kv_tokens"]
    flags = flags_of(d["command"])
    assert d["command"].startswith("vllm serve meta-llama/Llama-3.1-8B ")
    assert flags == {"--gpu-memory-utilization": "0.92", "--max-model-len": "32768", "--max-num-seqs": "8",
                     "--max-num-batched-tokens": "8192", "--kv-cache-dtype": "auto", "--tensor-parallel-size": "1"}
    pinned = flags_of(d["alternative"])
    assert int(pinned["--kv-cache-memory-bytes"]) == (8 * 32768 // 16 + 1) * 16 * 131072
    items = [r["item"] for r in d["rows"]]
    assert items[:3] == ["GPU total (CUDA)", "budget", "weights"] and "CUDA graphs" in items


def test_vllm_target_that_does_not_fit_ranks_fixes_that_do(capsys):
    d = advise_json(capsys, "--engine", "vllm", "llama-3.1-8b", "--gpu", "H100-80GB", "--max-model-len", "32768",
                    "--concurrency", "16")
    assert d["fits"] is False and d["fixes"]
    fitting = [f for f in d["fixes"] if f["fits"]]
    assert fitting and all(f["estimate_tokens"] >= f["needed_tokens"] for f in fitting)
    assert {"--kv-cache-dtype fp8", "--tensor-parallel-size 2"} <= {f["flags"] for f in fitting}
    assert d["fixes"].index(fitting[-1]) < len(fitting)  # fixes that fit come first


def test_vllm_model_too_large_for_one_gpu_says_vllms_error(capsys):
    d = advise_json(capsys, "--engine", "vllm", "llama-3.1-70b", "--gpu", "H100-80GB", "--max-model-len", "8192")
    assert d["refusal"].startswith("No available memory for the cache blocks")
    assert any(f["flags"] == "--tensor-parallel-size 4" and f["fits"] for f in d["fixes"])


def test_vllm_max_model_len_longer_than_the_pool_says_the_longest(capsys):
    d = advise_json(capsys, "--engine", "vllm", "llama-3.1-8b", "--gpu", "L4")
    assert d["refusal"].startswith("To serve at least one request with the model's max seq len (131072)")
    assert "estimated maximum model length is" in d["refusal"]
    assert any("GPU total estimated" in w for w in d["warnings"])  # L4: only nvidia-smi's total is known


def test_sglang_flags_and_command(capsys):
    d = advise_json(capsys, "--engine", "sglang", "meta-llama/Meta-Llama-3.1-8B-Instruct", "--gpu", "H200",
                    "--max-model-len", "65536", "--concurrency", "4", "--kv-dtype", "fp8")
    assert d["fits"] is True and d["model"] == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    flags = flags_of(d["command"])
    assert d["command"].startswith("python -m sglang.launch_server --model-path meta-llama/Meta-Llama-3.1-8B-Instruct")
    assert flags["--kv-cache-dtype"] == "fp8_e4m3" and flags["--context-length"] == "65536"
    assert flags["--max-running-requests"] == "4" and flags["--tp-size"] == "1"
    assert 0 < float(flags["--mem-fraction-static"]) < 1
    assert d["prediction"]["cell_bytes"] == 65536  # fp8: one byte per element


def test_sglang_fraction_fix_is_checked_against_the_headroom(capsys):
    base = ["--engine", "sglang", "llama-3.1-8b", "--gpu", "H100-80GB", "--concurrency", "3"]
    d = advise_json(capsys, *base, "--mem-fraction-static", "0.75")
    assert d["fits"] is False
    raised = [f for f in d["fixes"] if f["flags"].startswith("--mem-fraction-static")]
    assert raised and raised[0]["fits"]
    value = raised[0]["flags"].split()[1]
    again = advise_json(capsys, *base, "--mem-fraction-static", value)
    assert again["fits"] is True and again["warnings"] == []  # the raised fraction keeps enough headroom
    tight = advise_json(capsys, *base, "--mem-fraction-static", "0.99")
    assert any("expect an OOM under load" in w for w in tight["warnings"])


def test_table_output(capsys):
    code, out, _ = run(capsys, "advise", "--engine", "vllm", "llama-3.1-8b", "--gpu", "H100-80GB",
                       "--max-model-len", "32768", "--concurrency", "16")
    assert code == 0
    assert "available KV cache memory" in out and "does NOT fit" in out and "Fixes" in out
    assert "vllm serve meta-llama/Llama-3.1-8B" in out


@pytest.mark.parametrize("argv, fragment", [
    (["--engine", "tgi", "llama-3-8b"], "invalid choice: 'tgi'"),
    (["llama-3-8b"], "needs --engine and MODEL"),
    (["--engine", "vllm", "llama-3.1-8b", "--tp", "3"],
     "Total number of attention heads (32) must be divisible by tensor parallel size (3)"),
    (["--engine", "sglang", "llama-3.1-8b", "--tp", "3"], "32 is not divisible by 3"),
    (["--engine", "vllm", "llama-3.1-8b", "--max-model-len", "200000"], "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1"),
    (["--engine", "sglang", "llama-3-8b", "--max-model-len", "9000"], "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1"),
    (["--engine", "vllm", "llama-3.1-8b", "--kv-dtype", "int8"], "vLLM has no int8 KV cache"),
    (["--engine", "sglang", "llama-3.1-8b", "--kv-dtype", "int4"], "SGLang has no int4 KV cache"),
    (["--engine", "sglang", "llama-3.1-8b", "--kv-dtype", "fp16"], "SGLang has no fp16 KV cache"),
    (["--engine", "vllm", "llama-3.1-8b", "--gpu-memory-utilization", "1.5"], "0 < gpu_memory_utilization <= 1"),
    (["--engine", "sglang", "llama-3.1-8b", "--mem-fraction-static", "0"], "0 < --mem-fraction-static < 1"),
    (["--engine", "vllm", "llama-3.1-8b", "--concurrency", "4096", "--max-num-batched-tokens", "2048"],
     "max_num_batched_tokens (2048) must be greater than or equal to max_num_seqs (4096)"),
    (["--engine", "vllm", "llama-3.1-8b", "--engine-version", "0.6.3"], "older than kvscope models"),
    (["--engine", "sglang", "llama-3.1-8b", "--engine-version", "latest"], "malformed engine version"),
    (["--engine", "vllm", "llama-3.1-8b", "--concurrency", "0"], "concurrency must be a positive"),
    (["--engine", "vllm", "llama-3.1-8b", "--gpu", "H900"], "unknown GPU 'H900'"),
    (["--engine", "vllm", "no-such-model"], "unknown model"),
    (["--engine", "vllm", "llama-3.1-8b", "--gpu", "H100-80GB", "--gpu-memory", "80GB"], "not allowed with"),
])
def test_refusals_exit_2_without_traceback(capsys, argv, fragment):
    code, _, err = run(capsys, "advise", *argv)
    assert code == 2 and fragment in err
    assert "Traceback" not in err


# --- start-up logs -----------------------------------------------------------------------------------------------

def test_vllm_log_facts():
    f = logs.parse_log(FIXTURES / "vllm-0.15.1-a100-40gb-llama-3.1-8b.log")
    assert f.engine == "vllm" and f.get("version") == "0.15.1" and f.get("enforce_eager") is True
    assert (f.get("available_kv_gib"), f.get("kv_tokens"), f.get("max_concurrency")) == (19.28, 157_936, 1.2)
    assert f.get("max_model_len") == 131072 and f.get("weights_gib") == 14.99 and f.get("llm_class")


def test_sglang_log_facts_old_and_new_formats():
    old = logs.parse_log(FIXTURES / "sglang-docs-2025-01-llama-3.1-8b.log")
    assert old.engine == "sglang" and old.get("max_total_num_tokens") == 444_500
    assert (old.get("pre_load_free_gib"), old.get("after_weights_gib"), old.get("k_gib")) == (78.81, 63.72, 27.13)
    assert old.get("mem_fraction_static") == 0.88 and old.get("max_running_requests") == 2049
    new = logs.parse_log(FIXTURES / "sglang-0.5.23-format.log")
    assert new.get("kv_tokens") == 411_444 == new.get("max_total_num_tokens") and new.get("weights_gib") == 15.02


def test_from_log_vllm_0_19_compares_every_line(capsys):
    code, out, err = run(capsys, "advise", "--from-log", str(FIXTURES / "vllm-0.19.0-h100-llama-3.1-8b.log"),
                         "--gpu", "H100-80GB", "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    assert d["engine"] == "vllm" and d["version"] == "0.19.0" and d["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    lines = {ln["quantity"]: ln for ln in d["comparison"]}
    assert lines["available KV cache memory"]["log"] == 58.11
    assert abs(lines["available KV cache memory"]["error"]) < 0.002
    assert abs(lines["GPU KV cache size"]["error"]) < 0.002 and lines["weights"]["error"] == 0
    assert d["flags"]["--gpu-memory-utilization"] == "0.95"


def test_from_log_vllm_0_15_eager_offline(capsys):
    d = advise_json(capsys, "--from-log", str(FIXTURES / "vllm-0.15.1-a100-40gb-llama-3.1-8b.log"), "--gpu",
                    "A100-40GB", "llama-3.1-8b")
    assert "--enforce-eager" in d["command"] and d["prediction"]["max_num_batched_tokens"] == 8192
    lines = {ln["quantity"]: ln for ln in d["comparison"]}
    assert abs(lines["GPU KV cache size"]["error"]) < 0.002 and lines["maximum concurrency"]["log"] == 1.2


def test_from_log_sglang_table(capsys):
    code, out, _ = run(capsys, "advise", "--from-log", str(FIXTURES / "sglang-docs-2025-01-llama-3.1-8b.log"),
                       "--engine-version", "0.4.1")
    assert code == 0
    assert "max_total_num_tokens" in out and "444,500" in out and "vs kvscope" in out


@pytest.mark.parametrize("name, argv, fragment", [
    ("vllm-no-capacity.log", [], "has no KV capacity line"),
    ("sglang-docs-2025-01-llama-3.1-8b.log", ["--engine", "vllm"], "is a sglang log, but --engine vllm"),
    ("missing.log", [], "no such log file"),
])
def test_bad_logs_exit_2(capsys, name, argv, fragment):
    code, _, err = run(capsys, "advise", "--from-log", str(FIXTURES / name), *argv)
    assert code == 2 and fragment in err and "Traceback" not in err


def test_a_log_of_neither_engine(tmp_path):
    path = tmp_path / "nginx.log"
    path.write_text('127.0.0.1 - - [01/Dec/2026:10:00:00] "GET / HTTP/1.1" 200 612\n')
    with pytest.raises(UsageError, match="neither a vLLM nor an SGLang start-up log"):
        logs.parse_log(path)


def test_a_directory_is_not_a_log(capsys, tmp_path):
    code, _, err = run(capsys, "advise", "--from-log", str(tmp_path))
    assert code == 2 and "cannot read" in err
