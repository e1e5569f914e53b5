"""The planner with weight formats: exact bytes per format, max batch / context using them, fixes that say what they
free (weight memory, not KV), and Workload validation."""

from __future__ import annotations

import json

import pytest

from kvscope.errors import UsageError
from kvscope.models.spec import ModelSpec
from kvscope.planner import measured
from kvscope.planner.plan import plan
from kvscope.planner.workload import Workload
from kvscope.weightformats import INT4_WEIGHT_GROUP, WEIGHT_FORMATS, weight_format

SPEC = ModelSpec.from_catalogue("llama-3.1-8b")


def test_llama_31_8b_bytes_per_format():
    h, i, q, kv, layers = 4096, 14336, 4096, 1024, 32
    linears = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    dense = 2 * (SPEC.num_params() - layers * sum(n * k for n, k in linears))  # embeddings, head, norms in bf16
    int8 = layers * sum(n * k + 5 * n for n, k in linears)  # int8 values, fp32 scale + int8 zero point per row
    fp8 = layers * sum(n * k + 4 * n for n, k in linears)  # fp8 values, fp32 scale per row
    int4 = layers * sum(n * k // 2 + (k // INT4_WEIGHT_GROUP) * n * 4 for n, k in linears)  # no padding at 8B
    assert SPEC.weights_bytes("bf16", weights="int8") == dense + int8 == 9_088_081_920
    assert SPEC.weights_bytes("bf16", weights="fp8") == dense + fp8
    assert SPEC.weights_bytes("bf16", weights="int4") == dense + int4 == 5_809_643_520


def test_int4_pads_as_tinygemm_does():
    fmt = weight_format("int4")
    # 576 inputs pad to 1024, 100 outputs to 104; groups of 128 over the padded inputs, bf16 scale + zero each
    assert fmt.linear_bytes(100, 576) == 104 * 1024 // 2 + (1024 // 128) * 104 * 4


def test_max_batch_uses_the_weight_bytes():
    w = Workload(batch=8, context=4096, new_tokens=16, runtime="kvscope")  # 8 x 131k positions do not fit dense
    dense = plan(SPEC, w, gpu="H100-80GB")
    for fmt in WEIGHT_FORMATS:
        p = plan(SPEC, w.with_(weights=fmt), gpu="H100-80GB")
        assert p.weights_bytes == SPEC.weights_bytes("bf16", weights=fmt)
        assert p.max_batch > dense.max_batch and p.max_context > dense.max_context
    assert plan(SPEC, w.with_(weights="int4"), gpu="H100-80GB").max_batch > plan(
        SPEC, w.with_(weights="int8"), gpu="H100-80GB").max_batch


def test_quantized_products_price_their_temporaries():
    w = Workload(batch=1, context=128, new_tokens=16)  # prefill peaks: 128 rows per product
    dense = plan(SPEC, w)
    int8, fp8, int4 = (plan(SPEC, w.with_(weights=f)) for f in ("int8", "fp8", "int4"))
    biggest, rows = 14336 * 4096, 128  # the down / gate / up projections
    assert int8.activation_bytes - dense.activation_bytes == biggest * 2 + rows * 14336 * 2  # weight in bf16, scaled
    assert fp8.activation_bytes - dense.activation_bytes == biggest * (4 + 4 + 2)  # fp32 copy, fp32 product, bf16
    assert int4.activation_bytes - dense.activation_bytes == rows * 14336 * 2  # down's input, padded (no-op) copy


@pytest.fixture
def measured_in(tmp_path, monkeypatch):
    """Point the measured effects at `tmp_path` (empty: nothing measured) for one test."""
    monkeypatch.setattr(measured, "DATA", tmp_path)
    measured._read.cache_clear()
    yield tmp_path
    measured._read.cache_clear()


def test_a_weights_fix_says_it_frees_weight_memory_not_kv(measured_in):
    w = Workload(batch=1, context=8000, new_tokens=16, runtime="kvscope")
    p = plan(SPEC, w, gpu_memory="16GiB")
    assert not p.fits
    fixes = {f.option: f for f in p.advice}
    assert "--weights int8" in fixes and "--weights int4" in fixes
    fix = fixes["--weights int8"]
    assert fix.fits and fix.changes == {"weights": "int8"}
    freed = SPEC.weights_bytes("bf16") - SPEC.weights_bytes("bf16", weights="int8")
    assert "frees 6.49 GiB of weight memory (weights 14.96 GiB -> 8.46 GiB)" in fix.tradeoff
    assert "not KV" in fix.tradeoff
    assert f"{freed // SPEC.kv_bytes_per_token('bf16'):,} more bf16 KV tokens" in fix.tradeoff
    assert "decode" in fix.tradeoff and "perplexity" in fix.tradeoff
    ranks = [f.option for f in p.advice]
    assert ranks.index("--weights int8") < ranks.index("--weights fp8") < ranks.index("--weights int4")


@pytest.mark.parametrize("fmt", list(WEIGHT_FORMATS))
def test_a_quantized_model_that_does_not_fit_gets_fixes_and_no_tensor_parallel_one(fmt):
    """A weight format runs on one GPU's model: advice for a quantized workload offers no --tp (which would be a usage
    error as printed); the other fixes keep the format."""
    p = plan(SPEC, Workload(batch=300, context=4096, new_tokens=16, weights=fmt), gpu="H100-80GB")
    assert not p.fits and p.advice
    assert not [f for f in p.advice if "--tp" in f.option]
    assert all(f.workload.weights == fmt for f in p.advice if f.workload is not None)


def test_a_format_measured_to_decode_slowly_ranks_after_eviction(measured_in):
    (measured_in / "weights-cuda.json").write_text(json.dumps(
        {"decode": {"bf16": {"1": 200.0, "32": 100.0}, "int8": {"1": 40.0, "32": 34.0},
                    "int4": {"1": 270.0, "32": 45.0}}}))
    w = Workload(batch=1, context=8000, new_tokens=16, runtime="kvscope")
    ranks = [f.option for f in plan(SPEC, w, gpu_memory="16GiB").advice]
    budget = next(r for r in ranks if "--budget" in r)
    # fp8 unmeasured keeps its place; int8 at 0.2x of dense goes after eviction and after int4 (1.35x)
    assert ranks.index("--weights fp8") < ranks.index(budget) < ranks.index("--weights int4") < ranks.index(
        "--weights int8")
    assert measured.decode_ratio("int4", 30) == 0.45  # the measured batch nearest the workload's
    assert measured.decode_ratio("fp8", 1) is None


def test_a_format_measured_in_a_further_run_is_compared_with_that_runs_dense_row(measured_in):
    (measured_in / "weights-cuda.json").write_text(json.dumps(
        {"decode": {"bf16": {"1": 200.0}, "int8": {"1": 40.0}}}))
    (measured_in / "weights-cuda.int4.json").write_text(json.dumps(
        {"model": "llama-3.1-8b", "device": "H200", "decode": {"bf16": {"1": 212.0}, "int4": {"1": 271.4}}}))
    assert measured.decode_ratio("int4", 1) == 271.4 / 212.0  # not against the other run's 200
    assert measured.decode_ratio("int8", 1) == 0.2
    assert measured.decode_change("int4") == "decode 212 -> 271 tok/s at batch 1 (+28%) (llama-3.1-8b on H200)"
    assert measured.decode_ratio("fp8", 1) is None


def test_no_weights_fix_for_a_model_int4_cannot_group():
    spec = ModelSpec.from_catalogue("smollm2-135m")  # hidden 576: not a multiple of 128
    w = Workload(batch=4, context=2000, new_tokens=16, runtime="kvscope")
    between = (plan(spec, w).needed_bytes + plan(spec, w.with_(weights="int8")).needed_bytes) // 2
    p = plan(spec, w, gpu_memory=between)
    options = [f.option for f in p.advice]
    assert "--weights int8" in options and "--weights int4" not in options


def test_measured_effects_come_from_the_data_files(tmp_path, monkeypatch):
    monkeypatch.setattr(measured, "DATA", tmp_path)
    measured._read.cache_clear()
    assert measured.decode_change("int8") == "decode speed not measured"
    assert measured.perplexity_change("int8") == "perplexity not measured"
    (tmp_path / "weights-cuda.json").write_text(json.dumps(
        {"model": "llama-3.1-8b", "device": "H200", "decode": {"bf16": {"1": 200.0, "32": 3000.0},
                                                                 "int8": {"1": 100.0, "32": 2400.0}}}))
    (tmp_path / "weights-cpu.json").write_text(json.dumps(
        {"model": "smollm2-135m", "device": "CPU", "rows": [{"weights": "dense", "perplexity": 10.0},
                                                             {"weights": "int8", "perplexity": 10.1}]}))
    measured._read.cache_clear()
    try:
        assert measured.decode_change("int8") == ("decode 200 -> 100 tok/s at batch 1 (-50%), 3000 -> 2400 tok/s at "
                                                  "batch 32 (-20%) (llama-3.1-8b on H200)")
        assert measured.perplexity_change("int8") == "perplexity 10.000 -> 10.100 (+1.00%; smollm2-135m on CPU)"
        assert measured.perplexity_change("fp8") == "perplexity not measured"
        assert measured.prefill_change("int8") == "prefill speed not measured"
        (tmp_path / "weights-cuda.later.json").write_text(json.dumps(
            {"model": "llama-3.1-8b", "device": "H200", "formats": {
                "bf16": {"prefill": {"batch": 8, "context": 4096, "tps": 31046.3}},
                "int4": {"prefill": {"batch": 8, "context": 4096, "tps": 2044.6}}}}))
        measured._read.cache_clear()
        assert measured.prefill_change("int4") == ("prefill 31,046 -> 2,045 tok/s for 8 x 4096 tokens (-93%; "
                                                   "llama-3.1-8b on H200)")
    finally:
        measured._read.cache_clear()


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"weights": "int5"}, "unknown weight format 'int5'"),
    ({"weights": "int8", "tp": 2}, "tp"),
])
def test_workload_validates_weights(kwargs, needle):
    with pytest.raises(UsageError) as e:
        Workload(**kwargs)
    assert needle in str(e.value) and "weights" in str(e.value)


def test_int4_takes_bf16_only():
    with pytest.raises(UsageError) as e:
        plan(SPEC, Workload(dtype="fp16", weights="int4"))
    assert "bf16" in e.value.cli_message() and "--dtype" in e.value.cli_message()


def test_weights_compose_with_every_kv_dtype_and_a_budget():
    for kv in ("bf16", "fp8", "int8", "int4"):
        p = plan(SPEC, Workload(context=4096, runtime="kvscope", kv_dtype=kv, weights="int4", budget_tokens=1024,
                                policy="snapkv"))
        assert p.weights_bytes == SPEC.weights_bytes("bf16", weights="int4")
        assert p.kv_bytes_per_token == SPEC.kv_bytes_per_token(kv)


@pytest.mark.parametrize("weights", ["int8", "fp8", "int4"])
def test_a_prefill_reserves_the_sets_of_temporaries_its_format_leaves(weights):
    """Products' temporaries are allocated in every phase; fp8's prefill also keeps one more set of them reserved
    (measured on the H200: without it the planner said 248 sequences at 4096 + 16, and 248 ran out of memory)."""
    from kvscope.planner.memory import phase_tokens, phases, product_temporary_bytes

    w = Workload(batch=247, context=4096, new_tokens=16, runtime="kvscope", policy="full", weights=weights)
    dense = {p.name: p for p in phases(SPEC, w.with_(weights=None))}
    for p in phases(SPEC, w):
        temporary = product_temporary_bytes(SPEC, w, phase_tokens(w, p.name))
        assert p.activations == dense[p.name].activations + temporary
        sets = weight_format(weights).prefill_slack_sets if p.name == "prefill" else 0
        assert p.slack == dense[p.name].slack + sets * temporary
    assert weight_format("fp8").prefill_slack_sets == 1 and weight_format("int8").prefill_slack_sets == 0
