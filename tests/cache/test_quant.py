"""Quantized KV stores (fp8, int8, int4): exact bytes, reconstruction error, slot reuse, swap, and the cache on top."""

from __future__ import annotations

import pytest
import torch

from kvscope import _compat, policies
from kvscope.cache import BudgetedCache
from kvscope.cache import fused as fused_mod
from kvscope.cache.quant_int4 import Int4Store
from kvscope.cache.store import make_store
from kvscope.errors import UsageError
from kvscope.kvformats import DTYPE_BYTES, INT4_RESIDUAL, kv_format
from kvscope.models.spec import ModelSpec
from kvscope.runtime import generate
from tests.conftest import TINY, build_tiny

QUANTIZED = ["fp8", "int8", "int4"]
# relative reconstruction error ||x_hat - x|| / ||x|| on standard normal data, quantized tokens only
BOUND = {"int8": 0.01, "fp8": 0.04, "int4": 0.15}
# a tiny Llama int4 can pack: head_dim 64
TINY64 = dict(TINY, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64, intermediate_size=256)


def normal(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fixed_bytes(name, batch, heads, head_dim, dense):
    return batch * heads * kv_format(name).residual_tokens() * 2 * head_dim * dense


# --- bytes ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("slots", [12, 64, 150, 576])
@pytest.mark.parametrize("head_dim,dtype", [(64, torch.float32), (128, torch.bfloat16)])
def test_bytes_match_the_format(name, slots, head_dim, dtype):
    b, h = 2, 3
    dense = torch.tensor([], dtype=dtype).element_size()
    store = make_store(name, b, h, slots, head_dim, dtype, "cpu")
    per_token = kv_format(name).bytes_per_head_token(head_dim, dense)
    assert store.nbytes == b * h * slots * per_token + fixed_bytes(name, b, h, head_dim, dense)
    assert store.nbytes == sum(t.nbytes for t in store.tensors().values())


@pytest.mark.parametrize("head_dim", [16, 33, 80])
def test_int4_refuses_a_head_dim_it_cannot_pack(head_dim):
    with pytest.raises(UsageError, match=r"head_dim.*kv_dtype to int8"):
        make_store("int4", 1, 1, 64, head_dim, torch.float32, "cpu")


def test_int4_refusal_reaches_the_cache_user():
    cache = BudgetedCache(build_tiny(), "lru", budget_tokens=16, kv_dtype="int4")  # head_dim 16
    with pytest.raises(UsageError, match="int8"):
        generate(build_tiny(), torch.ones(1, 4, dtype=torch.long), cache, max_new_tokens=1)


# --- reconstruction ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", QUANTIZED)
def test_contiguous_round_trip_error(name):
    b, h, n, d = 2, 2, 448, 64
    k, v = normal(b, h, n, d, seed=1), normal(b, h, n, d, seed=2)
    store = make_store(name, b, h, n, d, torch.float32, "cpu")
    store.write_range(0, k, v)
    rk, rv = store.read(n, torch.float32)
    q = n - kv_format(name).residual_tokens()  # int4: the newest 128 tokens are still exact
    assert rel(rk[:, :, :q], k[:, :, :q]) < BOUND[name] and rel(rv[:, :, :q], v[:, :, :q]) < BOUND[name]
    assert torch.equal(rk[:, :, q:], k[:, :, q:]) and torch.equal(rv[:, :, q:], v[:, :, q:])


def test_int4_error_is_kivi_like():
    """Keys per channel: a channel with a large offset (typical of keys) costs no more than any other."""
    b, h, n, d = 1, 2, 512, 64
    k = normal(b, h, n, d, seed=3)
    k[..., 5] += 20.0  # outlier channel
    store = make_store("int4", b, h, n, d, torch.float32, "cpu")
    store.write_range(0, k, normal(b, h, n, d, seed=4))
    rk, _ = store.read(n, torch.float32)
    q = n - INT4_RESIDUAL
    assert rel(rk[:, :, :q, 6:], k[:, :, :q, 6:]) < 0.13
    assert (rk[:, :, :q, 5] - k[:, :, :q, 5]).abs().max() < 0.6  # half a step of a ~6.5-wide channel range


class Emulated:
    """Drives a store the way a BudgetedLayer does (free slots taken lowest first, random evictions) and keeps the
    exact keys and values of every slot's latest token next to it."""

    def __init__(self, name, b=2, h=2, slots=150, d=64, dtype=torch.float32, seed=0, device="cpu"):
        self.store = make_store(name, b, h, slots, d, dtype, device)
        self.device = device
        self.ref = torch.zeros(2, b, h, slots, d, dtype=dtype)
        self.written = torch.zeros(b, h, slots, dtype=torch.bool)
        self.valid = torch.zeros(b, h, slots, dtype=torch.bool)
        self.when = torch.full((b, h, slots), -1)  # index of the write that put each slot's latest token there
        self.writes = 0
        self.g = torch.Generator().manual_seed(seed)
        self.shape, self.fill = (b, h, slots, d), 0

    def step(self, n, budget):
        b, h, s, d = self.shape
        k = torch.randn(b, h, n, d, generator=self.g).to(self.ref.dtype)
        v = torch.randn(b, h, n, d, generator=self.g).to(self.ref.dtype)
        if self.fill + n <= s:  # the layer's contiguous phase
            slots = torch.arange(self.fill, self.fill + n).expand(b, h, n)
            self.store.write_range(self.fill, k.to(self.device), v.to(self.device))
            self.fill += n
        else:  # per-row free slots, so a row writes where other rows do not
            slots = torch.argsort(self.valid.to(torch.int8), dim=-1, stable=True)[..., :n].contiguous()
            self.store.write(slots.to(self.device), k.to(self.device), v.to(self.device))
            self.fill = s
        idx = slots[None, ..., None].expand(2, b, h, n, d)
        self.ref.scatter_(3, idx, torch.stack((k, v)))
        self.written.scatter_(2, slots, True)
        self.valid.scatter_(2, slots, True)
        self.when.scatter_(2, slots, self.writes + torch.arange(n).expand(b, h, n))
        self.writes += n
        self._evict(budget)

    def _evict(self, budget):
        keep = torch.rand(self.valid.shape, generator=self.g).masked_fill(~self.valid, -1)
        kept = keep.topk(budget, dim=-1).indices
        self.valid = torch.zeros_like(self.valid).scatter_(2, kept, True) & self.valid

    def read(self) -> torch.Tensor:
        return torch.stack(self.store.read(self.shape[2], torch.float32)).cpu()

    def error(self) -> float:
        kv = self.read()
        w = self.written[None, ..., None].expand_as(kv)
        return rel(kv[w], self.ref[w])


@pytest.mark.parametrize("name,slots", [("fp8", 150), ("int8", 150), ("int4", 150), ("int4", 192)])
def test_random_slots_and_reused_slots_round_trip(name, slots):
    """Chunked prefill, then decode with evictions: every slot reads back its latest token, over many reuse rounds
    (int4: ring overflows, flushes into key groups that already hold tokens, direct writes of long chunks)."""
    em = Emulated(name, slots=slots)
    budget = slots - 40
    for n in (30, 200, 7, 33, 40):  # 200 > the int4 ring: quantized straight away
        em.step(min(n, 40), budget)
    for step in range(400):
        em.step(1 if step % 50 else 37, budget)
        if step % 100 == 0:
            assert em.error() < BOUND[name], step
    assert em.error() < BOUND[name]


def test_int4_keeps_the_newest_tokens_exact():
    em = Emulated("int4", slots=192)
    for step in range(300):
        em.step(1 if step > 3 else 40, budget=150)
    kv = torch.stack(em.store.read(192, torch.float32))
    newest = em.when >= em.writes - INT4_RESIDUAL // 2  # the ring holds 64 to 128 of the newest tokens
    assert torch.equal(kv[:, newest], em.ref[:, newest])
    assert rel(kv[:, ~newest & em.written], em.ref[:, ~newest & em.written]) > 0.01


@pytest.mark.parametrize("name", QUANTIZED)
def test_read_of_a_prefix_is_the_prefix_of_a_full_read(name):
    em = Emulated(name, slots=150)
    for _ in range(10):
        em.step(20, budget=100)
    full = em.store.read(150, torch.float32)
    for upto in (1, 63, 64, 65, 128, 149, 150):
        part = em.store.read(upto, torch.float32)
        assert all(torch.equal(p, f[:, :, :upto]) for p, f in zip(part, full))


@pytest.mark.parametrize("name", QUANTIZED)
def test_read_dtype(name):
    em = Emulated(name, slots=150, dtype=torch.bfloat16)
    em.step(40, budget=100)
    k, v = em.store.read(40, torch.bfloat16)
    assert k.dtype == v.dtype == torch.bfloat16 and k.shape == (2, 2, 40, 64)
    assert torch.isfinite(k).all() and rel(k, em.ref[0, :, :, :40]) < BOUND[name]


@pytest.mark.parametrize("name", QUANTIZED)
def test_swap_round_trip_is_bit_exact(name):
    """Copy every tensor out to the CPU, wreck the store, copy back: it reads and evolves exactly like a twin."""
    a, b = Emulated(name, seed=5), Emulated(name, seed=5)
    for em in (a, b):
        for n in (40, 40, 40, 1, 1, 37):
            em.step(n, budget=100)
    saved = {k: t.to("cpu", copy=True) for k, t in a.store.tensors().items()}
    for t in a.store.tensors().values():
        t.view(torch.uint8).fill_(0x7B)
    for k, t in a.store.tensors().items():
        t.copy_(saved[k])
    for em in (a, b):
        for n in (1, 1, 40, 1):
            em.step(n, budget=100)
    assert all(torch.equal(x, y) for x, y in zip(a.store.read(150, torch.float32), b.store.read(150, torch.float32)))


@pytest.mark.gpu
@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_store_agrees_with_cpu(name, dtype):
    cpu, gpu = Emulated(name, seed=7, dtype=dtype), Emulated(name, seed=7, dtype=dtype, device="cuda")
    for step in range(200):
        for em in (cpu, gpu):
            em.step(1 if step > 5 else 40, budget=100)
    assert gpu.error() < BOUND[name]
    assert rel(gpu.read(), cpu.read()) < 0.01  # fp8 casts may round a tie differently


@pytest.mark.gpu
@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_agree_with_eager_ops(name, dtype, monkeypatch):
    """The Triton kernels (quantize-and-write, read, int4 ring write) against the eager reference on the same GPU."""
    fused, eager = (Emulated(name, seed=9, dtype=dtype, device="cuda") for _ in range(2))
    for step in range(200):
        for em, use in ((fused, True), (eager, False)):
            monkeypatch.setattr(fused_mod, "USE_TRITON", use)
            em.step(1 if step % 40 else 33, budget=100)  # range writes first, then scattered ones
    for (key, a), b in zip(fused.store.tensors().items(), eager.store.tensors().values()):
        same = (a.view(torch.uint8) == b.view(torch.uint8)).float().mean().item()
        assert same > 0.999, (key, same)  # a rounding tie may go the other way, rarely
    for upto in (1, 31, 32, 63, 64, 65, 149, 150):
        monkeypatch.setattr(fused_mod, "USE_TRITON", True)
        got = torch.stack(fused.store.read(upto, dtype))
        monkeypatch.setattr(fused_mod, "USE_TRITON", False)
        ref = torch.stack(fused.store.read(upto, dtype))
        assert got.dtype == dtype and got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=2**-7, atol=1e-6)  # an FMA may round the last bit differently
    assert fused_mod.ran("quant_triton.pertoken_read") or fused_mod.ran("quant_triton.int4_read"), "no fused kernel ran"
    assert eager.error() < BOUND[name] and fused.error() < BOUND[name]
    monkeypatch.setattr(fused_mod, "USE_TRITON", True)  # into the cache's read buffer: the same values, in place
    b, h, slots, d = fused.store.shape if name == "int4" else fused.store.data.shape[:3] + fused.store.data.shape[4:]
    buffer = torch.empty(2, b, h, slots, d, dtype=dtype, device="cuda")
    got = fused.store.read(150, dtype, out=buffer)
    assert got[0].untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    torch.testing.assert_close(torch.stack(got), torch.stack(fused.store.read(150, dtype)), rtol=0, atol=0)


def test_int4_tensors_are_everything():
    store = Int4Store(1, 1, 150, 64, torch.float32, "cpu")
    owned = {id(t) for t in store.tensors().values()}
    assert all(id(v) in owned for v in vars(store).values() if isinstance(v, torch.Tensor))


# --- the cache on top ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny64():
    return build_tiny(TINY64)


def prompt(batch=2, length=40, pad=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("kv_dtype", QUANTIZED)
@pytest.mark.parametrize("policy", policies.available())
def test_every_policy_runs_on_every_quantized_format(tiny64, policy, kv_dtype):
    p = policies.get(policy)
    ids, mask = prompt(length=30)
    budget = 40 if policy == "full" else max(12, p.min_budget())
    cache = BudgetedCache(tiny64, p, budget_tokens=budget, kv_dtype=kv_dtype, chunk_size=8)
    out = generate(tiny64, ids, cache, attention_mask=mask, max_new_tokens=6, chunk_size=16, keep_first_logits=True)
    assert out.sequences.shape == (2, 6) and torch.isfinite(out.first_token_logits).all()
    stats = cache.stats()
    assert stats.stored_tokens <= budget and stats.kv_dtype == kv_dtype
    assert (stats.evicted_tokens > 0) == (policy != "full")


def teacher_forced_logits(model, ids, cache=None, prefill=150, chunk=None):
    """Logits of every position: a prefill forward, then one token per forward (decode-shaped writes)."""
    kw = {_compat.cache_keyword(model): cache} if cache is not None else {}
    with torch.inference_mode():
        if cache is None:
            return model(input_ids=ids).logits
        out = [model(input_ids=ids[:, :prefill], use_cache=True, **kw).logits]
        for i in range(prefill, ids.shape[1]):
            out.append(model(input_ids=ids[:, i:i + 1], use_cache=True, **kw).logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("kv_dtype,bound,chunk", [("bf16", 0.005, 512), ("int8", 0.012, 512), ("fp8", 0.05, 37),
                                                  ("int4", 0.2, 37), ("int4", 0.2, 512)])
def test_logits_stay_close_to_fp32_when_nothing_is_evicted(tiny64, kv_dtype, bound, chunk):
    """Past the int4 ring: prompt 150 (chunk 512: 22 tokens quantized at once; chunk 37: ring overflow), then 40
    decode steps (ring flushes into partly filled key groups)."""
    ids, _ = prompt(batch=2, length=190, pad=0, seed=3)
    ref = teacher_forced_logits(tiny64, ids)
    cache = BudgetedCache(tiny64, "full", budget_tokens=256, kv_dtype=kv_dtype, chunk_size=chunk)
    got = teacher_forced_logits(tiny64, ids, cache)
    err = (got - ref).norm(dim=-1) / ref.norm(dim=-1)  # per position
    assert err.max() < bound and err.mean() < bound / 2
    assert cache.stats().evicted_tokens == 0


def test_a_byte_budget_holds_more_tokens_with_int4(tiny64):
    budget = 2**20
    tokens = {dt: BudgetedCache(tiny64, "lru", budget_bytes=budget, kv_dtype=dt).budget_tokens
              for dt in ("bf16", "fp8", "int8", "int4")}
    assert tokens["int4"] > 3 * tokens["bf16"]
    assert tokens["bf16"] < tokens["int8"] < tokens["int4"] and tokens["fp8"] > tokens["int8"]


# --- the planner agrees --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_dtype", QUANTIZED + ["bf16"])
def test_planner_prices_what_the_cache_allocates(tiny64, kv_dtype):
    spec = ModelSpec.from_catalogue("llama-3-8b")
    per_head = kv_format(kv_dtype).bytes_per_head_token(spec.head_dim, DTYPE_BYTES.get(kv_dtype, 2))
    assert spec.kv_bytes_per_token(kv_dtype, tp=1) == spec.num_layers * spec.num_kv_heads * per_head

    batch, budget, chunk = 2, 40, 24  # capacity 64: a whole int4 key group
    ids, mask = prompt(batch, length=30)
    cache = BudgetedCache(tiny64, "lru", budget_tokens=budget, kv_dtype=kv_dtype, chunk_size=chunk)
    generate(tiny64, ids, cache, attention_mask=mask, max_new_tokens=3)
    tiny_spec = ModelSpec.from_hf_config(TINY64)
    capacity = budget + chunk
    expected = tiny_spec.num_layers * batch * capacity * cache.bytes_per_token(4)
    expected += batch * tiny_spec.kv_fixed_bytes(kv_dtype, "fp32")  # the int4 window, in the model's fp32
    assert cache.allocated_bytes == expected
    assert cache.bytes_per_token(4) * tiny_spec.num_layers == tiny_spec.kv_bytes_per_token(kv_dtype)


def test_an_int4_flush_a_row_at_a_time_is_the_same_flush(monkeypatch):
    """The flush decodes a block of rows at a time (quant_int4.FLUSH_BLOCK_BYTES): one row per block gives the same
    store, byte for byte, as every row at once, through range writes, scattered writes and evictions."""
    from kvscope.cache import quant_int4

    whole, rows = Emulated("int4", b=3, seed=11), Emulated("int4", b=3, seed=11)
    for step in range(160):
        for em, block in ((whole, 1 << 40), (rows, 1)):
            monkeypatch.setattr(quant_int4, "FLUSH_BLOCK_BYTES", block)
            em.step(1 if step % 30 else 45, budget=100)
    for (name, a), b in zip(whole.store.tensors().items(), rows.store.tensors().values()):
        assert torch.equal(a, b), name
    assert rows.error() < BOUND["int4"]


def test_an_int4_flush_decodes_only_the_key_groups_it_touches(monkeypatch):
    """A flush after range writes decodes the span of the flushed slots, whole key groups, not the whole store."""
    spans = []
    decode = Int4Store._dequantize

    def spy(self, n, dtype, lo=0):
        spans.append((lo, n))
        return decode(self, n, dtype, lo)

    monkeypatch.setattr(Int4Store, "_dequantize", spy)
    em = Emulated("int4", slots=400, seed=3)
    for _ in range(300):
        em.step(1, budget=400)
    flushes = [s for s in spans if s != (0, 400)]
    assert flushes and all(hi - lo <= 128 and lo % 64 == 0 for lo, hi in flushes), flushes
    assert em.error() < BOUND["int4"]
