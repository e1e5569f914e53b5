import pytest

from kvscope.errors import UsageError
from kvscope.models.spec import ModelSpec
from kvscope.planner import Workload, estimate, memory, plan, plan_model
from kvscope.planner.gpus import GPUS, gpu
from kvscope.planner.search import largest, largest_from, max_batch, max_context
from kvscope.planner.sizes import format_bytes, parse_size

SPEC = ModelSpec.from_catalogue("llama-3-8b")
H100 = GPUS["H100-80GB"].memory_bytes
REQUIRED_KEYS = {"weights_bytes", "kv_bytes_per_token", "kv_bytes", "activation_bytes", "overhead_bytes",
                 "peak_bytes", "capacity_bytes", "fits", "max_batch", "max_context", "advice"}


def test_plan_keys_and_golden_components():
    p = plan(SPEC, Workload(batch=2, context=1000, new_tokens=1))
    d = p.to_dict()
    assert set(d) >= REQUIRED_KEYS
    assert d["weights_bytes"] == 16_060_522_496
    assert d["kv_bytes_per_token"] == 131072
    assert d["kv_bytes"] == 2 * 1000 * 131072  # prefill peak: the prompt's KV
    # 4 hidden + 3 intermediate + 2 head_dim values per prompt token, bf16
    assert d["activation_bytes"] == 2000 * 2 * (4 * 4096 + 3 * 14336 + 2 * 128)
    assert d["peak_bytes"] == (d["weights_bytes"] + d["kv_bytes"] + d["activation_bytes"] + d["logits_bytes"]
                               + d["workspace_bytes"])
    assert d["capacity_bytes"] == H100


def test_decode_phase_dominates_long_generations():
    p = plan(SPEC, Workload(batch=4, context=64, new_tokens=4000))
    assert p.peak_phase == "decode"
    final = 64 + 4000 - 1
    assert p.kv_bytes == 4 * final * 131072 + 4 * (final - 1) * 8 * 128 * 2


def test_fits_is_monotone_in_batch_and_matches_max_batch():
    w = Workload(batch=1, context=4096, new_tokens=8)
    b = max_batch(SPEC, w, H100)
    assert b > 1
    assert estimate(SPEC, w.with_(batch=b), H100).fits
    assert not estimate(SPEC, w.with_(batch=b + 1), H100).fits
    c = max_context(SPEC, w.with_(batch=b + 1), H100)
    assert c < 4096 and estimate(SPEC, w.with_(batch=b + 1, context=c), H100).fits


def test_max_context_capped_by_positions():
    w = Workload(batch=1, context=128, new_tokens=100)
    # prompt + new - 1 positions: the last new token is never fed back
    assert max_context(SPEC, w, GPUS["H200"].memory_bytes) == 8192 - 100 + 1


def test_nothing_fits_gives_zero():
    w = Workload(batch=1, context=1024, new_tokens=8)
    p = plan(ModelSpec.from_catalogue("llama-3-70b"), w, gpu="T4")
    assert not p.fits and p.max_batch == 0 and p.max_context == 0


@pytest.mark.parametrize("n", [0, 1, 2, 7, 64, 1000])
@pytest.mark.parametrize("start", [1, 5, 64, 999, 5000])
def test_searches_find_the_edge(n, start):
    calls = []

    def ok(x):
        calls.append(x)
        return x <= n

    assert largest(ok, 1, 2000) == n
    calls.clear()
    assert largest_from(ok, start, 1, 2000) == n
    assert len(calls) <= 2 * 12 + 2


def test_search_from_a_good_prediction_is_cheap():
    calls = []
    assert largest_from(lambda x: calls.append(x) or x <= 500, 498, 1, 1 << 20) == 500
    assert len(calls) <= 5


def test_advice_when_it_does_not_fit():
    w = Workload(batch=64, context=8000, new_tokens=16)
    p = plan(SPEC, w, gpu="H100-80GB")
    assert not p.fits and p.advice
    assert [f.rank for f in p.advice] == list(range(1, len(p.advice) + 1))
    for fix in p.advice:
        assert fix.fits and fix.estimate_bytes <= fix.available_bytes
        assert fix.needed_bytes == p.needed_bytes and fix.available_bytes == H100
        assert "needed" in fix.message and "available" in fix.message and fix.option in fix.message
    options = " ".join(f.option for f in p.advice)
    assert f"--batch {p.max_batch}" in options
    assert "--kv-dtype int8" in options and "--budget" in options and "--tp" in options


def test_advice_replans_the_batch_fix_exactly():
    w = Workload(batch=64, context=8000, new_tokens=16)
    fix = next(f for f in plan(SPEC, w).advice if f.option.startswith("--batch"))
    assert fix.estimate_bytes == estimate(SPEC, w.with_(batch=fix.changes["batch"]), H100).needed_bytes


def test_advice_suggests_larger_gpu():
    w = Workload(batch=8, context=4096, new_tokens=16)
    fixes = plan(SPEC, w, gpu="L4").advice
    gpu_fix = [f for f in fixes if f.option.startswith("--gpu")]
    assert gpu_fix and gpu_fix[0].changes["gpu"] in GPUS


def test_no_advice_when_it_fits():
    assert plan(SPEC, Workload(batch=1, context=512, new_tokens=8)).advice == []


def test_kvscope_runtime_with_budget_holds_less():
    w = Workload(batch=16, context=8000, new_tokens=64, runtime="kvscope")
    full = plan(SPEC, w)
    capped = plan(SPEC, w.with_(budget_tokens=2048))
    # per layer: keys and values 16 x 8 heads x 2560 slots x 128 x 2 B each; valid, position, score (1 + 8 + 4 B per
    # slot); newest and the insert's slot (8 B per row); a 512-entry free-slot queue (8 B each); one queue pointer
    per_layer = 2 * 16 * 8 * 2560 * 128 * 2 + 16 * 8 * 2560 * (1 + 8 + 4) + 2 * 16 * 8 * 8 + 16 * 8 * 512 * 8
    assert capped.kv_bytes == 32 * per_layer + 256 == 5_521_867_008
    assert capped.peak_bytes < full.peak_bytes
    int4 = plan(SPEC, w.with_(kv_dtype="int4"))
    assert int4.kv_bytes_per_token == SPEC.kv_bytes_per_token("int4")


def test_tensor_parallel_is_per_gpu():
    w = Workload(batch=1, context=4096, new_tokens=16)
    p1 = plan(ModelSpec.from_catalogue("llama-3-70b"), w, gpu="H100-80GB")
    p4 = plan(ModelSpec.from_catalogue("llama-3-70b"), w.with_(tp=4), gpu="H100-80GB")
    assert not p1.fits and p4.fits
    assert p4.kv_bytes_per_token == p1.kv_bytes_per_token // 4


def test_planner_matches_traced_live_bytes_on_cpu():
    """The activation model against the real transformers code path: live tensor bytes traced on the CPU."""
    import torch

    from kvscope.monitor.tracer import LiveTensorTracker
    from tests.conftest import TINY, build_tiny

    config = {**TINY, "hidden_size": 128, "intermediate_size": 352, "num_attention_heads": 4, "head_dim": 32,
              "num_key_value_heads": 2, "vocab_size": 64, "num_hidden_layers": 3}
    model = build_tiny(config, dtype=torch.bfloat16)
    spec = ModelSpec.from_hf_config(config)
    for batch, context in [(2, 256), (1, 512), (4, 96)]:
        ids = torch.randint(3, 60, (batch, context))
        with torch.no_grad(), LiveTensorTracker.for_model(model) as tracker:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                           pad_token_id=0)
        phases = memory.phases(spec, Workload(batch=batch, context=context, new_tokens=2))
        predicted = max(p.total for p in phases) - memory.WORKSPACE_BYTES - spec.weights_bytes("bf16")
        assert abs(predicted - tracker.peak_bytes) / tracker.peak_bytes < 0.01, (batch, context)


def test_plan_model_accepts_a_path(tmp_path):
    from tests.conftest import TINY, write_config

    d = write_config(tmp_path / "m", TINY)
    p = plan_model(str(d), batch=2, context=100, new_tokens=10, gpu_memory="1GiB")
    assert p.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2 and p.fits


@pytest.mark.parametrize("kwargs, fragment", [
    ({"batch": 0}, "batch must be a positive"),
    ({"batch": -3}, "batch must be a positive"),
    ({"context": 0}, "context must be a positive"),
    ({"new_tokens": -1}, "new tokens must be a positive"),
    ({"tp": 0}, "tensor-parallel degree"),
    ({"budget_tokens": 0, "runtime": "kvscope"}, "KV budget"),
    ({"kv_dtype": "int3"}, "unknown KV dtype 'int3'.*int4"),
    ({"dtype": "fp64"}, "unknown dtype"),
    ({"runtime": "vllm"}, "unknown runtime"),
    ({"kv_dtype": "int8"}, "runtime='kvscope'"),
    ({"budget_tokens": 100}, "runtime='kvscope'"),
    ({"budget_tokens": 2.5, "runtime": "kvscope"}, "budget_tokens must be a whole number"),
])
def test_bad_workloads(kwargs, fragment):
    """Library errors name the Python parameter (the CLI's name the flag: tests/cli)."""
    with pytest.raises(UsageError, match=fragment) as err:
        Workload(**kwargs)
    assert "--" not in str(err.value)


def test_context_beyond_positions_mentions_rope():
    with pytest.raises(UsageError, match="8192.*no scaling.*131072"):
        plan(SPEC, Workload(context=9000, new_tokens=1))
    with pytest.raises(UsageError, match="llama3 scaling factor 8"):
        plan(ModelSpec.from_catalogue("llama-3.1-8b"), Workload(context=131072, new_tokens=2))
    plan(ModelSpec.from_catalogue("llama-3.1-8b"), Workload(context=131072, new_tokens=1))  # 131072 positions: fits


def test_sizes():
    assert parse_size("24GiB") == 24 * 1024**3
    assert parse_size("80 GB") == 80 * 10**9
    assert parse_size("1.5TiB") == int(1.5 * 1024**4)
    assert parse_size("512mib") == 512 * 1024**2
    assert parse_size(1000) == 1000
    for bad in ("24XB", "GiB", "-1GiB", "0GB", "", "1e9", True, "80", " 1073741824 "):
        with pytest.raises(UsageError):
            parse_size(bad)
    assert format_bytes(16_060_522_496) == "14.96 GiB"


def test_gpu_catalogue():
    for name in ("H100-80GB", "H200", "A100-80GB", "A100-40GB", "L40S", "L4", "A10G", "RTX-4090", "RTX-3090", "T4"):
        assert gpu(name).memory_bytes > 10 * 1024**3
    assert gpu("h100").name == "H100-80GB" and gpu("rtx 4090").name == "RTX-4090"
    with pytest.raises(UsageError, match="H100-80GB.*T4"):
        gpu("H900")
    with pytest.raises(UsageError, match="both gpu and gpu_memory"):
        plan(SPEC, Workload(), gpu="H200", gpu_memory="24GiB")
