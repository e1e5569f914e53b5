import json

import pytest

from kvscope.cli.main import main

KEYS = {"weights_bytes", "kv_bytes_per_token", "kv_bytes", "activation_bytes", "overhead_bytes", "peak_bytes",
        "capacity_bytes", "fits", "max_batch", "max_context", "advice"}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json(capsys):
    code, out, err = run(capsys, "plan", "llama-3-8b", "--batch", "64", "--context", "8000", "--new-tokens", "16",
                         "--format", "json")
    assert code == 0, err
    d = json.loads(out)
    assert set(d) >= KEYS
    assert d["fits"] is False and d["advice"] and d["weights_bytes"] == 16_060_522_496


def test_plan_table(capsys):
    code, out, _ = run(capsys, "plan", "llama-3.1-70b", "--gpu", "A100-80GB", "--context", "32768", "--batch", "4")
    assert code == 0
    assert "KV cache" in out and "fits" in out and "Fixes" in out and "--tp" in out


def test_plan_gpu_memory_and_kvscope_runtime(capsys):
    code, out, _ = run(capsys, "plan", "llama-3.2-1b", "--gpu-memory", "8GiB", "--runtime", "kvscope",
                       "--kv-dtype", "int4", "--budget", "1024", "--context", "16000", "--format", "json")
    assert code == 0
    d = json.loads(out)
    assert d["capacity_bytes"] == 8 * 1024**3 and d["workload"]["kv_dtype"] == "int4"


@pytest.mark.parametrize("argv, fragment", [
    (["plan", "llama-9b"], "unknown model 'llama-9b'"),
    (["plan", "llama-3-8b", "--gpu", "H900"], "unknown GPU 'H900'"),
    (["plan", "llama-3-8b", "--gpu-memory", "24XB"], "malformed size"),
    (["plan", "llama-3-8b", "--gpu-memory=-4GiB"], "malformed size"),
    (["plan", "llama-3-8b", "--batch", "0"], "batch must be a positive"),
    (["plan", "llama-3-8b", "--batch", "-2"], "batch must be a positive"),
    (["plan", "llama-3-8b", "--new-tokens", "0"], "new tokens must be a positive"),
    (["plan", "llama-3-8b", "--context", "9000"], "supports 8192"),
    (["plan", "llama-3-8b", "--kv-dtype", "int8"], "--runtime kvscope"),
    (["plan", "llama-3-8b", "--tp", "3"], "does not divide"),
    (["plan", "/nonexistent/model"], "no such file or directory"),
])
def test_bad_input_exit_2_one_line_no_traceback(capsys, argv, fragment):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert fragment in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "change " in err


def test_broken_config_path(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{")
    code, _, err = run(capsys, "plan", str(tmp_path))
    assert code == 2 and str(tmp_path) in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["plan"], ["plan", "llama-3-8b", "--batch", "abc"], ["plan", "x", "--format", "xml"],
                                  ["nosuchcommand"]])
def test_argparse_errors_exit_2(capsys, argv):
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_env_json(capsys):
    code, out, _ = run(capsys, "env", "--format", "json")
    d = json.loads(out)
    assert code == 0 and d["kvscope"] and "torch" in d["packages"] and "transformers" in d["packages"]
    assert "cuda_available" in d and "PYTORCH_CUDA_ALLOC_CONF" in d["environment"]


def test_env_table(capsys):
    code, out, _ = run(capsys, "env")
    assert code == 0 and "transformers:" in out and "python:" in out


def test_module_entry_point():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "kvscope", "plan", "smollm2-135m", "--format", "json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kv_bytes_per_token"] == 23040
