"""The doctor with weight formats, on the CPU: a quantized model is diagnosed with its real weight bytes, a weights
fix is applicable only where its format runs, applying it quantizes the loaded model, and a workload that says other
weights than the model holds is refused."""

from __future__ import annotations

import json

import pytest

from kvscope.cli.main import main
from kvscope.doctor.apply import _requantize
from kvscope.doctor.diagnose import fixes_from_plan
from kvscope.errors import UsageError
from kvscope.models.loader import LoadedModel
from kvscope.models.quantize import model_bytes, weights_format_of
from kvscope.models.spec import ModelSpec
from kvscope.planner.plan import plan
from kvscope.planner.workload import Workload
from tests.conftest import TINY, build_tiny

pytest.importorskip("torchao")


def test_doctor_runs_a_quantized_model_and_reports_its_bytes(capsys, tiny_model_dir, tmp_path):
    code = main(["doctor", str(tiny_model_dir), "--device", "cpu", "--batch", "1", "--context", "40", "--new-tokens",
                 "4", "--runtime", "kvscope", "--weights", "int8", "--out", str(tmp_path / "r"), "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    d = json.loads(out)
    spec = ModelSpec.from_hf_config(TINY, name="tiny")
    assert d["workload"]["weights"] == "int8"
    assert d["prediction"]["weights_bytes"] == spec.weights_bytes("fp32", weights="int8")
    buffers = sum(b.numel() * b.element_size() for b in build_tiny().buffers())  # RoPE's inverse frequencies
    assert d["model"]["weights_bytes"] == spec.weights_bytes("fp32", weights="int8") + buffers


def test_a_workload_that_says_other_weights_is_refused(tmp_path):
    from kvscope.doctor import doctor

    loaded = LoadedModel(build_tiny(), None, ModelSpec.from_hf_config(TINY, name="tiny"))
    with pytest.raises(UsageError, match="weights are dense"):
        doctor(loaded, Workload(batch=1, context=8, new_tokens=2, weights="int8"), out=tmp_path / "r")


def test_weights_fixes_are_applicable_where_their_format_runs():
    spec = ModelSpec.from_catalogue("llama-3.1-8b")
    advice = plan(spec, Workload(batch=1, context=8000, new_tokens=16, runtime="kvscope"), gpu_memory="16GiB").advice
    on_cpu = {f.option: f.applicable for f in fixes_from_plan(advice, cuda=False, device="cpu")}
    assert not any(on_cpu.values())  # the CPU runs no GPU fix
    # as a CUDA machine judges them (its capability is checked only for int4, which this test leaves out)
    on_gpu = {f.option: f.applicable for f in fixes_from_plan([f for f in advice if "int4" not in f.option],
                                                             cuda=True, device="cuda")}
    assert on_gpu["--weights int8"] and on_gpu["--weights fp8"]


def test_applying_a_weights_fix_quantizes_the_loaded_model():
    model = build_tiny()
    loaded = LoadedModel(model, None, ModelSpec.from_hf_config(TINY, name="tiny"))
    before = model_bytes(model)
    _requantize(loaded, "fp8")
    assert weights_format_of(model) == "fp8" and model_bytes(model) < before
    _requantize(loaded, "fp8")  # already in that format: nothing to do
    assert weights_format_of(model) == "fp8"
