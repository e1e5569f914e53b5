"""The recall tier: what a chunked prefill evicts waits in CPU memory and the question's attention brings it back."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kvscope.cache import BudgetedCache
from kvscope.cache.layer import BudgetedLayer
from kvscope.errors import UsageError
from kvscope.models.spec import ModelSpec
from kvscope.planner.memory import recall_host_bytes
from kvscope.planner.sizes import format_bytes
from kvscope.planner.workload import Workload
from kvscope.policies.base import Observation, Policy, SlotState
from kvscope.runtime import generate
from tests.conftest import TINY, build_tiny

PROMPT, CHUNK, BUDGET = 64, 8, 16
SNAP = 40  # above snapkv's minimum (its 32-token window + 1)


@dataclass
class FlipAtEnd(Policy):
    """Keeps the newest tokens until the prompt's last chunk is observed, then the oldest: a question that needs what
    the early chunks evicted. No `name`: a test policy, not registered."""

    attention = "window"
    window: int = 4
    final_from: int = PROMPT - CHUNK

    def on_insert(self, state: SlotState, slots: torch.Tensor, keys: torch.Tensor) -> None:
        state.score.scatter_(-1, slots, state.position.gather(-1, slots).float())

    def observe(self, state: SlotState, obs: Observation) -> None:
        if int(obs.query_position.min()) >= self.final_from:
            state.score.copy_(-state.position.float())

    def keep_scores(self, state: SlotState, budget: int) -> torch.Tensor:
        return state.score


# a tiny Llama int4 can pack: head_dim 64
TINY64 = dict(TINY, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64, intermediate_size=256)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


@pytest.fixture(scope="module")
def tiny64():
    return build_tiny(TINY64)


def model_for(kv_dtype, tiny, tiny64):
    return tiny64 if kv_dtype == "int4" else tiny


def ids(batch=1, length=PROMPT, seed=0):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def kept_positions(cache) -> list[set[int]]:
    layer = cache.layers[0]
    st = layer.state
    return [set(st.position[0, h][st.valid[0, h]].tolist()) for h in range(st.valid.shape[1])]


def prefill(model, cache, prompt):
    return generate(model, prompt, cache, max_new_tokens=1, chunk_size=CHUNK)


@pytest.mark.parametrize("kv_dtype", [None, "int8", "int4", "fp8"])
def test_the_question_brings_back_what_early_chunks_evicted(tiny, tiny64, kv_dtype):
    tiny = model_for(kv_dtype, tiny, tiny64)
    without = BudgetedCache(tiny, FlipAtEnd(), budget_tokens=BUDGET, chunk_size=CHUNK, kv_dtype=kv_dtype)
    prefill(tiny, without, ids())
    with_tier = BudgetedCache(tiny, FlipAtEnd(), budget_tokens=BUDGET, chunk_size=CHUNK, kv_dtype=kv_dtype,
                              recall="cpu")
    prefill(tiny, with_tier, ids())
    # without the tier, the oldest tokens were gone before the question: what is left is the newest of the old ones
    assert all(p == set(range(40, 56)) for p in kept_positions(without))
    assert all(p == set(range(0, 16)) for p in kept_positions(with_tier))
    assert max(with_tier.recalled_tokens) == BUDGET
    assert without.recalled_tokens == [0] * len(without.layers)


def test_recalled_keys_and_values_are_the_ones_stored(tiny):
    """A recalled token's KV equals what a cache that never evicted it holds (fp32: exact)."""
    full = BudgetedCache(tiny, "full", budget_tokens=PROMPT + 1, chunk_size=CHUNK)
    prefill(tiny, full, ids())
    tier = BudgetedCache(tiny, FlipAtEnd(), budget_tokens=BUDGET, chunk_size=CHUNK, recall="cpu")
    prefill(tiny, tier, ids())
    for a, b in zip(full.layers, tier.layers):
        ka, va = a.store.read(a.capacity, torch.float32)
        kb, vb = b.store.read(b.capacity, torch.float32)
        for h in range(kb.shape[1]):
            for slot in torch.nonzero(b.state.valid[0, h]).flatten().tolist():
                pos = int(b.state.position[0, h, slot])
                src = int(torch.nonzero(a.state.valid[0, h] & (a.state.position[0, h] == pos)))
                assert torch.allclose(kb[0, h, slot], ka[0, h, src], atol=1e-6)
                assert torch.allclose(vb[0, h, slot], va[0, h, src], atol=1e-6)


def test_a_left_padded_row_recalls_its_own_oldest_tokens(tiny):
    """The host bounds what a row evicts by the longest row: the shorter, padded row's tier slots past its own
    evictions are marked not valid, and it gets back its own oldest real tokens."""
    pad = 8
    prompt = ids(batch=2)
    mask = torch.ones_like(prompt)
    mask[1, :pad] = 0
    cache = BudgetedCache(tiny, FlipAtEnd(final_from=PROMPT - CHUNK - pad), budget_tokens=BUDGET, chunk_size=CHUNK,
                          recall="cpu")  # the last chunk of the padded row starts `pad` positions earlier
    generate(tiny, prompt, cache, attention_mask=mask, max_new_tokens=1, chunk_size=CHUNK)
    st = cache.layers[0].state
    for row in (0, 1):  # positions count real tokens: the padded row's first real token is at position 0 too
        for h in range(st.valid.shape[1]):
            assert sorted(st.position[row, h][st.valid[row, h]].tolist()) == list(range(BUDGET))


def test_a_continued_cache_fits_its_tier(tiny):
    """A prompt added to a cache that holds tokens evicts what was held too: the tier is sized for the prompt plus
    evict_batch - 1 (the most a row can evict beyond the prompt), and the row keeps its budget."""
    from kvscope.cache.tier import Tier

    cache = BudgetedCache(tiny, "snapkv", budget_tokens=SNAP, chunk_size=CHUNK, recall="cpu", evict_batch=4)
    first = generate(tiny, ids(), cache, max_new_tokens=3, chunk_size=CHUNK)
    grown, original = [], Tier._grow

    def spy(self, need):
        grown.append(need)
        return original(self, need)

    Tier._grow = spy
    try:
        generate(tiny, torch.cat([first.sequences[:, -1:], ids(length=2 * CHUNK, seed=1)], 1), cache,
                 max_new_tokens=2, chunk_size=CHUNK)
    finally:
        Tier._grow = original
    assert grown == []
    assert cache.recall_bytes(2 * CHUNK + 1, 1, torch.float32) == \
        Tier(cache.layers[0], 2 * CHUNK + 1 + 3).nbytes * len(cache.layers)
    assert cache.held_tokens() <= SNAP
    assert max(cache.recalled_tokens) > 0


def test_a_tier_grows_keeping_what_it_holds(tiny):
    """The tier's safety net: more evictions than its size make it grow, and what it held is still there."""
    from kvscope.cache.tier import Tier

    cache = BudgetedCache(tiny, "snapkv", budget_tokens=SNAP, chunk_size=CHUNK)
    prefill(tiny, cache, ids())
    layer = cache.layers[0]
    st = layer.state
    tier = Tier(layer, 4)
    with torch.inference_mode():
        slots = torch.arange(st.valid.shape[-1]).expand_as(st.valid)
        tier.add(layer, slots[..., :3], st.valid[..., :3])
        tier.add(layer, slots[..., 3:], st.valid[..., 3:])
    assert tier.capacity > 4 and tier.used == st.valid.shape[-1]
    k, _ = tier.keys_values(slice(0, 3), "cpu")
    stored, _ = layer.store.read(layer.capacity, torch.float32)
    assert torch.equal(k, stored[:, :, :3])
    assert torch.equal(tier.first_record(slice(0, 3), "cpu")["position"], st.position[:, :, :3])
    k, v = tier.keys_values(slice(0, tier.used), "cpu")
    assert torch.equal(k, stored) and torch.equal(tier.first_record(slice(0, tier.used), "cpu")["valid"], st.valid)
    assert torch.equal(tier.first_record(slice(0, tier.used), "cpu")["score"], st.score)


@pytest.mark.parametrize("kv_dtype,padded", [(None, False), ("fp8", False), ("int8", True), ("bf16", True),
                                             ("int4", False)])
def test_consecutive_layers_move_together_as_one_move_per_layer_would(tiny64, monkeypatch, kv_dtype, padded):
    """A recorded prefill's evictions wait and go to the tiers several layers at once (one gather per field): every
    tier then holds, field by field, what a move per layer gives (a dense, fp8 or int8 store, a bf16 store of an fp32
    model, a left-padded batch); int4 (re-quantized to int8) moves a layer at once."""
    from kvscope.cache import recall as module
    from kvscope.cache import tier as tiers

    model = build_tiny(dict(TINY64, num_hidden_layers=3))
    prompt = ids(batch=2 if padded else 1)
    mask = torch.ones_like(prompt)
    mask[-1, :5 if padded else 0] = 0
    groups, original_move = [], tiers._move

    def spy_move(found, *args, **kwargs):
        groups.append(len(found))
        return original_move(found, *args, **kwargs)

    def run(group_bytes):
        seen, original = {}, module.recall

        def spy(layer, tier, *args):
            seen[layer.index] = {k: v.clone() for k, v in tier.fields(slice(0, tier.used), "cpu").items()}
            return original(layer, tier, *args)

        monkeypatch.setattr(tiers, "GROUP_BYTES", group_bytes)
        monkeypatch.setattr(module, "recall", spy)
        monkeypatch.setattr(tiers, "_move", spy_move)
        groups.clear()
        cache = BudgetedCache(model, "snapkv", budget_tokens=SNAP, chunk_size=CHUNK, kv_dtype=kv_dtype, recall="cpu")
        generate(model, prompt, cache, attention_mask=mask, max_new_tokens=1, chunk_size=CHUNK)
        st = cache.layers[-1].state
        return seen, list(groups), (st.valid.clone(), st.position.clone())

    together, sizes, kept = run(1 << 40)
    alone, one_each, kept_alone = run(1)
    assert one_each and set(one_each) == {1}
    assert set(sizes) == ({1} if kv_dtype == "int4" else {3})
    assert together.keys() == alone.keys() == {0, 1, 2}
    for index, fields in together.items():
        assert fields.keys() == alone[index].keys()
        valid = fields["valid"]
        assert torch.equal(valid, alone[index]["valid"]) and valid.any()
        for name, t in fields.items():  # padding rows (not valid) hold whatever the evicted order put there too
            other = alone[index][name]
            assert torch.equal(t.contiguous().view(torch.uint8), other.contiguous().view(torch.uint8)), name
    assert all(torch.equal(a, b) for a, b in zip(kept, kept_alone))


def test_the_arenas_stacked_views_are_the_layers_own(tiny):
    cache = BudgetedCache(tiny, "snapkv", budget_tokens=SNAP, chunk_size=CHUNK)
    prefill(tiny, cache, ids())
    arena = cache.settings.arena
    for name in ("position", "score", "store.keys", "store.values"):
        stacked = arena.stacked(name, 0, len(cache.layers))
        for i in range(len(cache.layers)):
            own = arena.views[f"{i}.{name}"]
            assert stacked[i].data_ptr() == own.data_ptr() and torch.equal(stacked[i], own)
        assert arena.stacked(name, 1, 1)[0].data_ptr() == arena.views[f"1.{name}"].data_ptr()
    arena.views["1.score"] = arena.views["1.score"][..., 1:]  # a layout whose views are not evenly spaced
    with pytest.raises(ValueError, match="not evenly spaced"):
        arena.stacked("score", 0, 2)


@pytest.mark.parametrize("kv_dtype", [None, "int8", "int4", "fp8"])
@pytest.mark.parametrize("layers", [1, 3])
def test_the_staging_views_are_the_records_fields(tiny, tiny64, kv_dtype, layers):
    """A move's staging (several layers' at once): each field view (one as_strided) covers the bytes the record
    layout gives it, in each layer's part of each record."""
    from kvscope.cache.tier import Tier, _staging, views

    model = model_for(kv_dtype, tiny, tiny64)
    cache = BudgetedCache(model, "snapkv", budget_tokens=SNAP, chunk_size=CHUNK, kv_dtype=kv_dtype)
    prefill(model, cache, ids(batch=2))
    tier = Tier(cache.layers[0], 8)
    flat, staged, fields = _staging(tier.rows, tier.records, layers, 5, "cpu")
    assert len(staged) == layers
    for parts in staged:
        assert [t.shape for t in parts] == [(5, *tier.rows, size) for _, size in tier.records]
    assert sum(t.numel() for parts in staged for t in parts) == flat.numel() == layers * tier.staging_bytes(5)
    assert len({t.data_ptr() for parts in staged for t in parts}) == layers * len(tier.records)
    for g, parts in enumerate(staged):
        expected = {name: t.movedim(0, 2) for name, t in views(parts, tier.records).items()}
        assert fields.keys() == expected.keys()
        for name, t in expected.items():  # the same elements of the same memory
            got = fields[name][g]
            strides = [[st for st, size in zip(x.stride(), x.shape) if size > 1] for x in (got, t)]  # a dim of 1: any
            assert (got.shape, got.dtype, got.data_ptr()) == (t.shape, t.dtype, t.data_ptr())
            assert strides[0] == strides[1]


@pytest.mark.parametrize("kv_dtype,span_bytes,chunk", [(None, None, CHUNK), (None, 1, CHUNK), ("int8", 1, CHUNK),
                                                       (None, None, 48), ("int8", 7, 48)])
def test_the_question_attends_the_whole_prompt_in_one_softmax(tiny, monkeypatch, kv_dtype, span_bytes, chunk):
    """The two passes over the keys (every row's output with a running log-sum-exp, then the question's weights), in
    one span or one slot at a time, give the softmax of every logit at once: resident, waiting, and the last chunk's
    own keys up to each row (in the denominator and the output, and among the question's weights for a window policy,
    which chooses among the whole prompt; lru's weights leave them out); every row's output is that softmax times
    every value; and the waiting tokens' fields are as the tier holds them."""
    from kvscope.cache import recall as module

    if span_bytes is not None:
        monkeypatch.setattr(module, "SPAN_BYTES", span_bytes)

    checked = []
    original = module._question

    def spy(layer, tier, query, w, scaling, chunk, with_chunk=False):
        got, waiting, out = original(layer, tier, query, w, scaling, chunk, with_chunk)
        held = slice(0, tier.used)
        checked.extend(torch.equal(waiting[name], tier.first_record(held, query.device)[name])
                       for name in ("position", "score", "valid"))
        own_k, own_v, real = chunk[:3]
        resident = layer.store.read(layer.capacity, query.dtype)
        waited = tier.keys_values(held, query.device)
        keys = torch.cat([resident[0], waited[0], own_k], 2)
        values = torch.cat([resident[1], waited[1], own_v], 2)
        b, hq, n, _ = query.shape
        h = keys.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()  # row j sees the chunk up to itself
        valid = torch.cat([layer.state.valid[:, :, None, :].expand(-1, -1, n, -1),
                           tier.first_record(held, query.device)["valid"][:, :, None, :].expand(-1, -1, n, -1),
                           (causal & real[:, None, :])[:, None].expand(-1, h, -1, -1)], -1)  # [B, H, n, all]
        grouped = query.reshape(b, h, hq // h, n, query.shape[-1]).float()
        logits = (grouped @ keys.float()[:, :, None].transpose(-1, -2)) * scaling
        p = logits.masked_fill(~valid[:, :, None], float("-inf")).softmax(-1)  # [B, H, g, n, all]
        question = p[..., n - w:, :].mean(2)  # the last w rows
        checked.append(w == min(n, 32 if layer.settings.policy.name == "snapkv" else module.RECALL_WINDOW))
        if with_chunk:  # a window policy: the chunk's columns are candidates too
            checked.append(torch.allclose(got, question, atol=1e-6))
        else:
            checked.append(torch.allclose(got, question[..., :-n], atol=1e-6))
            checked.append(bool((got.sum(-1) < 1 - 1e-3).all()))  # the chunk took part of every row's mass
        want = (p @ values.float()[:, :, None]).reshape(b, hq, n, -1)
        checked.append(torch.allclose(out, want, atol=1e-5))
        return got, waiting, out

    monkeypatch.setattr(module, "_question", spy)
    for policy in ("snapkv", "lru"):  # 48-token forwards: a last forward of 40 rows, longer than the question
        cache = BudgetedCache(tiny, policy, budget_tokens=SNAP, chunk_size=chunk, recall="cpu", kv_dtype=kv_dtype)
        generate(tiny, ids(batch=2, length=136 if chunk == 48 else PROMPT), cache, max_new_tokens=1, chunk_size=chunk)
    assert len(checked) == len(cache.layers) * (6 + 7) and all(checked)  # snapkv 6 checks a layer, lru 7


def test_the_last_forwards_output_is_the_whole_prompts_attention(tiny, monkeypatch):
    """Every row of the last forward (longer than snapkv's window) leaves each layer with the output the recall
    computed over the whole prompt."""
    from kvscope.cache import layer as layer_module
    from kvscope.cache import recall as module

    exact, outputs = [], []
    original, attend = module.recall, layer_module.BudgetedLayer.attend

    def spy(*args):
        count, out, choice = original(*args)
        exact.append(out.clone())
        return count, out, choice

    def attend_spy(self, query, scaling, info):
        final = self.settings.recall_state == "final"
        out = attend(self, query, scaling, info)
        if final:
            outputs.append(out.clone())
        return out

    monkeypatch.setattr(module, "recall", spy)
    monkeypatch.setattr(layer_module.BudgetedLayer, "attend", attend_spy)
    chunk = 48  # the last forward (136 - 2 x 48 = 40 tokens) is longer than snapkv's 32-row window
    cache = BudgetedCache(tiny, "snapkv", budget_tokens=SNAP, chunk_size=chunk, recall="cpu")
    generate(tiny, ids(length=136), cache, max_new_tokens=1, chunk_size=chunk)
    layers = tiny.config.num_hidden_layers
    assert len(exact) == layers
    assert len(outputs) == layers  # the prompt's last forward
    for want, got in zip(exact, outputs):
        assert torch.equal(got, want.to(got.dtype))
        assert got.shape[2] == 40


@pytest.mark.parametrize("policy", ["snapkv", "lru"])
def test_the_last_forward_attends_as_in_a_one_forward_prefill(tiny, monkeypatch, policy):
    """At layer 0 (whose keys and values do not depend on what was evicted) the last forward's output with the tier
    is the output of a prefill that keeps everything and takes the prompt in one forward, every row of it."""
    from kvscope.cache import layer as layer_module
    from kvscope.cache import recall as module

    exact, original = [], module.recall
    monkeypatch.setattr(module, "recall", lambda *args: exact.append(original(*args)) or exact[-1])
    prompt = ids(batch=2, length=136)
    chunk = 48  # the last forward: 40 tokens
    generate(tiny, prompt, BudgetedCache(tiny, policy, budget_tokens=SNAP, chunk_size=chunk, recall="cpu"),
             max_new_tokens=1, chunk_size=chunk)
    want_rows = exact[0][1]  # layer 0

    outputs, attend = [], layer_module.BudgetedLayer.attend

    def spy(self, query, scaling, info):
        out = attend(self, query, scaling, info)
        if self.index == 0 and not outputs:
            outputs.append(out)
        return out

    monkeypatch.setattr(layer_module.BudgetedLayer, "attend", spy)
    generate(tiny, prompt, BudgetedCache(tiny, "full", budget_tokens=136 + 1, chunk_size=136), max_new_tokens=1,
             chunk_size=136)
    assert want_rows.shape[2] == 40  # the whole last forward, not snapkv's 32-row window or lru's RECALL_WINDOW
    torch.testing.assert_close(want_rows, outputs[0][:, :, -40:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy,budget,room,chunk,length", [
    ("snapkv", SNAP, 48, 48, 136), ("tova", SNAP, 48, 48, 136), ("snapkv", SNAP, 52, 52, 136),
    ("snapkv", 64, 8, 40, 200), ("tova", 64, 8, 40, 200), ("snapkv", 64, 16, 48, 192)])
def test_a_window_policy_keeps_what_a_one_chunk_prefill_keeps_at_layer_0(tiny, policy, budget, room, chunk, length):
    """At layer 0 (whose keys, values and question do not depend on what was evicted) a window policy with the tier
    ends the prefill holding what a one-forward prefill under the same budget holds: it chooses once among the whole
    prompt, the last chunk's tokens too. With 52-token chunks the last forward is snapkv's 32-row window, no more;
    with a room smaller than the forwards the last one is taken in pieces, and the budget is above the room, so rows
    bring back different counts of tokens, more than the room (none of them may land on a kept token)."""
    prompt = torch.randint(3, 256, (2, length), generator=torch.Generator().manual_seed(1))
    kept = []
    for size, forward, recall in ((room, chunk, "cpu"), (length, length, None)):
        cache = BudgetedCache(tiny, policy, budget_tokens=budget, chunk_size=size, recall=recall)
        generate(tiny, prompt, cache, max_new_tokens=1, chunk_size=forward)
        st = cache.layers[0].state
        kept.append([[sorted(st.position[b, h][st.valid[b, h]].tolist()) for h in range(st.valid.shape[1])]
                     for b in range(2)])
    assert kept[0] == kept[1]
    assert all(len(p) == budget for row in kept[0] for p in row)


def test_every_piece_of_a_last_forward_in_pieces_holds_the_budget(tiny, monkeypatch):
    """A last forward longer than the layer's room is taken in pieces: each piece is written next to the budget (the
    recall's whole-prompt choice and the best of the rest), not only what stays at the end."""
    from kvscope.cache import layer as layer_module

    seen, original = [], layer_module.BudgetedLayer._chunk

    def spy(self, query, keys, values, positions, real, scaling, choice=None, exact=None):
        if self.index == 0 and choice is not None:
            seen.append(self.state.valid.sum(-1).min().item())
        return original(self, query, keys, values, positions, real, scaling, choice, exact)

    monkeypatch.setattr(layer_module.BudgetedLayer, "_chunk", spy)
    cache = BudgetedCache(tiny, "snapkv", budget_tokens=SNAP, chunk_size=8, recall="cpu")
    generate(tiny, ids(batch=2, length=128), cache, max_new_tokens=1, chunk_size=64)
    assert len(seen) == 8 and seen == [SNAP] * 8
    assert cache.held_tokens() == SNAP


@pytest.mark.parametrize("policy", ["snapkv", "tova"])
def test_a_span_of_the_question_holds_at_most_span_bytes(tiny, monkeypatch, policy):
    """What one span puts on the device (its record, fp32 keys, the question's logits) stays within SPAN_BYTES, also
    for tova, whose one observed query makes the logits small and the keys the bound."""
    from kvscope.cache import recall as module

    monkeypatch.setattr(module, "SPAN_BYTES", 16 * 1024)
    spans = {"first": [], "all": []}  # the scoring pass streams first records, the second pass every record
    first, every = module.Tier.first_record, module.Tier.fields

    def spy_first(self, span, device):
        spans["first"].append((self, span.stop - span.start))
        return first(self, span, device)

    def spy_every(self, index, device):
        if isinstance(index, slice):  # a span; a recall's gather of the kept tokens is an index tensor
            spans["all"].append((self, index.stop - index.start))
        return every(self, index, device)

    monkeypatch.setattr(module.Tier, "first_record", spy_first)
    monkeypatch.setattr(module.Tier, "fields", spy_every)
    cache = BudgetedCache(tiny, policy, budget_tokens=SNAP, chunk_size=CHUNK, recall="cpu")
    generate(tiny, ids(batch=2, length=2 * PROMPT), cache, max_new_tokens=1, chunk_size=CHUNK)
    layer = cache.layers[0]
    b, h = layer.state.valid.shape[:2]
    rows = min(module.window(cache.settings.policy), CHUNK) * tiny.config.num_attention_heads // h  # the last chunk's
    d = layer.head_dim
    records = spans["first"][0][0].records
    own, out = b * h * rows * CHUNK * 4, b * h * rows * d * 4  # held across the first pass, the second
    first_token = b * h * (records[0][1] + d * 4 + rows * 4)
    every_token = b * h * (sum(size for _, size in records) + 2 * d * 4 + rows * 4)
    assert spans["first"] and max(n for _, n in spans["first"]) * first_token + own <= 16 * 1024
    assert spans["all"] and max(n for _, n in spans["all"]) * every_token + out <= 16 * 1024
    assert len(spans["all"]) > 2 * len(cache.layers)  # the tier took more than one span a pass


def test_a_span_keeps_its_floor_when_what_the_recall_holds_passes_span_bytes(tiny):
    """At a large batch the rows' output and queries alone pass SPAN_BYTES (batch 4 of the 8B shape at 512-token
    chunks: 64 MiB): a span still takes a quarter of SPAN_BYTES, not one token (thousands of launches a layer)."""
    from kvscope.cache import recall as module

    cache = BudgetedCache(tiny, "snapkv", budget_tokens=SNAP, chunk_size=CHUNK, recall="cpu")
    generate(tiny, ids(batch=2, length=2 * PROMPT), cache, max_new_tokens=1, chunk_size=CHUNK)
    tier = module.Tier(cache.layers[0], 8)
    b_h, rows, d = 4 * 8, 4 * 512, 128  # batch 4, 8 KV heads, 4 query heads each, 512 rows, head_dim 128
    roomy = module._span(tier, b_h, rows, d, values=True, held=0)
    for held in (3 * module.SPAN_BYTES // 4, module.SPAN_BYTES, 3 * module.SPAN_BYTES):
        assert abs(module._span(tier, b_h, rows, d, values=True, held=held) - roomy / 4) <= 1
    assert module._span(tier, b_h, rows, d, values=True, held=module.SPAN_BYTES // 2) > roomy // 4


def test_gpu_side_stays_within_budget_plus_one_chunk_and_the_tier_is_freed(tiny, monkeypatch):
    sizes = []
    original = BudgetedLayer._chunk

    def checked(self, *args):
        out = original(self, *args)
        sizes.append((self.store.keys.shape[2], int(self.state.valid.sum(-1).max())))
        return out

    monkeypatch.setattr(BudgetedLayer, "_chunk", checked)
    cache = BudgetedCache(tiny, "snapkv", budget_tokens=40, chunk_size=CHUNK, recall="cpu")
    generate(tiny, ids(batch=2), cache, max_new_tokens=4, chunk_size=CHUNK)
    assert sizes and all(slots <= 40 + CHUNK and held <= 40 for slots, held in sizes)
    assert all(layer.tier is None for layer in cache.layers)
    assert cache.settings.recall_state is None


def test_no_recall_without_evictions_and_with_one_chunk(tiny):
    """A prompt that fits, or arrives in one forward, leaves nothing waiting: same tokens as without the tier."""
    for budget, chunk in [(PROMPT + 8, CHUNK), (SNAP, PROMPT)]:
        a = BudgetedCache(tiny, "snapkv", budget_tokens=budget, chunk_size=chunk)
        b = BudgetedCache(tiny, "snapkv", budget_tokens=budget, chunk_size=chunk, recall="cpu")
        out_a = generate(tiny, ids(), a, max_new_tokens=6, chunk_size=chunk)
        out_b = generate(tiny, ids(), b, max_new_tokens=6, chunk_size=chunk)
        assert torch.equal(out_a.sequences, out_b.sequences)
        assert b.recalled_tokens == [0] * len(b.layers)


@pytest.mark.parametrize("policy", ["snapkv", "lru", "h2o", "tova"])
def test_every_attention_reading_policy_recalls_within_budget(tiny, policy):
    cache = BudgetedCache(tiny, policy, budget_tokens=SNAP, chunk_size=CHUNK, recall="cpu")
    out = generate(tiny, ids(batch=2), cache, max_new_tokens=3, chunk_size=CHUNK)
    assert out.sequences.shape == (2, 3)
    assert cache.held_tokens() <= SNAP


def test_a_failed_prefill_frees_the_tier(tiny, monkeypatch):
    cache = BudgetedCache(tiny, "snapkv", budget_tokens=SNAP, chunk_size=CHUNK, recall="cpu")
    calls = {"n": 0}
    original = BudgetedLayer._chunk

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 14:  # layer 0 in the seventh chunk: the sixth began evicting into the tier
            assert self.tier is not None and self.tier.used > 0
            raise RuntimeError("boom")
        return original(self, *args)

    monkeypatch.setattr(BudgetedLayer, "_chunk", failing)
    with pytest.raises(RuntimeError, match="boom"):
        generate(tiny, ids(), cache, max_new_tokens=2, chunk_size=CHUNK)
    assert all(layer.tier is None for layer in cache.layers if layer.is_initialized)
    assert cache.settings.recall_state is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(policy="streaming_llm"), "reads no attention"),
    (dict(policy="sliding_window"), "reads no attention"),
    (dict(policy="snapkv", recall="gpu"), "unknown recall tier"),
])
def test_impossible_recall_is_a_usage_error(tiny, kwargs, message):
    kwargs = {"recall": "cpu", **kwargs}
    with pytest.raises(UsageError, match=message) as err:
        BudgetedCache(tiny, budget_tokens=SNAP, chunk_size=CHUNK, **kwargs)
    assert "recall" in str(err.value)


def test_recall_with_offload_is_a_usage_error(tiny):
    with pytest.raises(UsageError, match="offload"):
        BudgetedCache(tiny, "snapkv", budget_tokens=SNAP, chunk_size=CHUNK, recall="cpu", offload=True)


def test_not_enough_host_memory_says_how_much_is_needed(tiny, monkeypatch):
    import psutil

    class Tight:
        available = 1024

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tight())
    cache = BudgetedCache(tiny, "snapkv", budget_tokens=SNAP, chunk_size=CHUNK, recall="cpu")
    need = cache.recall_bytes(PROMPT, 1, torch.float32)
    with pytest.raises(UsageError, match="host memory") as err:
        generate(tiny, ids(), cache, max_new_tokens=2, chunk_size=CHUNK)
    assert f"may need {format_bytes(need)} of host memory" in str(err.value)
    assert "but 1.00 KiB is available" in str(err.value)
    assert cache.settings.recall_state is None


@pytest.mark.parametrize("kv_dtype", [None, "int8", "int4", "fp8"])
def test_recall_bytes_cover_what_the_tier_allocates(tiny, tiny64, kv_dtype):
    from kvscope.cache.tier import Tier

    tiny = model_for(kv_dtype, tiny, tiny64)
    cache = BudgetedCache(tiny, "snapkv", budget_tokens=SNAP, chunk_size=CHUNK, kv_dtype=kv_dtype,
                          recall="cpu")
    prefill(tiny, cache, ids())
    layer = cache.layers[0]
    tier = Tier(layer, PROMPT)
    assert cache.recall_bytes(PROMPT, 1, torch.float32) == tier.nbytes * len(cache.layers)
    spec = ModelSpec.from_hf_config(TINY64 if kv_dtype == "int4" else TINY)
    w = Workload(batch=1, context=PROMPT, new_tokens=1, dtype="fp32", kv_dtype=kv_dtype, runtime="kvscope",
                 budget_tokens=SNAP, chunk_size=CHUNK, policy="snapkv", recall="cpu")
    assert recall_host_bytes(spec, w) == tier.nbytes * len(cache.layers)  # the planner prices the tier to the byte


@pytest.mark.gpu
def test_on_cuda_the_tier_is_pinned_and_recalls_as_on_the_cpu():
    """CUDA: pinned host tier, copies on a side stream; the kept positions are the CPU run's."""
    cpu, gpu = build_tiny(), build_tiny().cuda()
    kept = []
    for model in (cpu, gpu):
        cache = BudgetedCache(model, FlipAtEnd(), budget_tokens=BUDGET, chunk_size=CHUNK, recall="cpu")
        seen = {}
        original = BudgetedLayer._recall

        def spy(self, *args, seen=seen, original=original):
            seen["pinned"] = all(t.is_pinned() for t in self.tier.buffers) if self.tier.stream is not None else None
            return original(self, *args)

        BudgetedLayer._recall = spy
        try:
            generate(model, ids().to(next(model.parameters()).device), cache, max_new_tokens=2, chunk_size=CHUNK)
        finally:
            BudgetedLayer._recall = original
        kept.append([sorted(p) for p in kept_positions(cache)])
        if model is gpu:
            assert seen["pinned"] is True
    assert kept[0] == kept[1] == [list(range(16))] * len(kept[0])


@pytest.mark.gpu
def test_on_cuda_a_long_prompt_holds_no_copy_of_what_it_moved():
    """The GPU buffers of a copy to the tier are freed when the copy is done. When the first layer recalls, every
    layer has moved its evictions of a 4k prompt: the device then holds the cache's allocation and one chunk's
    activations, not the moved KV (it once kept every buffer until the recall: the whole evicted KV on the GPU)."""
    model = build_tiny().cuda()
    prompt = torch.randint(10, 100, (1, 4096), device="cuda")
    cache = BudgetedCache(model, "snapkv", budget_tokens=SNAP, chunk_size=64, recall="cpu")
    seen, original = {}, BudgetedLayer._recall

    def spy(self, *args):
        seen.setdefault("allocated", torch.cuda.memory_allocated())
        return original(self, *args)

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    BudgetedLayer._recall = spy
    try:
        generate(model, prompt, cache, max_new_tokens=1, chunk_size=64)
    finally:
        BudgetedLayer._recall = original
    moved = cache.recall_bytes(4096, 1, torch.float32)
    assert seen["allocated"] - base < cache.settings.arena.nbytes + moved / 2, (seen, base, moved)


def test_a_running_softmax_adds_spans_as_one_softmax():
    """`_add_span` over spans (one row seeing nothing in the first, one seeing nothing at all until the last) gives
    the softmax of all the logits at once, times all the values."""
    from kvscope.cache.recall import _add_span

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 10, generator=gen)
    logits[0, 0, 1, :4] = float("-inf")
    logits[1, 2, 3, :7] = float("-inf")
    values = torch.randn(2, 3, 10, 5, generator=gen)
    out = torch.zeros(2, 3, 4, 5)
    lse = torch.full((2, 3, 4, 1), float("-inf"))
    for at in (slice(0, 4), slice(4, 7), slice(7, 10)):
        lse = _add_span(out, lse, logits[..., at].clone(), values[:, :, at])
    torch.testing.assert_close(out, logits.softmax(-1) @ values)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1, keepdim=True))


def test_every_span_of_the_recall_holds_its_bytes(tiny, monkeypatch):
    """No span of the recall's passes (the resident slots', the waiting tokens' and the last forward's own) makes
    logits of more than SPAN_BYTES, every row of the last forward at once (a resident read whole once made fp32
    logits of 2048 rows by every resident slot: 320 MiB over the prefill's peak on the H200)."""
    from kvscope.cache import recall as module

    limit, sizes = 64 * 1024, []
    monkeypatch.setattr(module, "SPAN_BYTES", limit)
    original = module._add_span
    monkeypatch.setattr(module, "_add_span", lambda out, lse, logits, values: sizes.append(logits.nbytes)
                        or original(out, lse, logits, values))
    cache = BudgetedCache(tiny, "snapkv", budget_tokens=SNAP, chunk_size=48, recall="cpu")
    generate(tiny, ids(batch=2, length=136), cache, max_new_tokens=1, chunk_size=48)
    assert len(sizes) > 3 * len(cache.layers) and max(sizes) <= limit
