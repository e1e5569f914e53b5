"""kvscope.runtime.generate: continuing a cache, rewinding it, sampling, stop tokens and strings, streaming."""

from __future__ import annotations

import pytest
import torch

from kvscope.cache import BudgetedCache
from kvscope.errors import UsageError
from kvscope.runtime import Sampling, generate
from kvscope.runtime.stops import cut_at_stop
from tests.conftest import build_tiny


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


def ids_of(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, length), generator=g)


def full(model, budget=400):
    return BudgetedCache(model, "full", budget_tokens=budget)


def test_continuing_a_cache_equals_one_prefill(tiny):
    a, b = ids_of(37, 1), ids_of(21, 2)
    once = generate(tiny, torch.cat([a, b], 1), full(tiny), max_new_tokens=12, chunk_size=16)
    cache = full(tiny)
    generate(tiny, a, cache, max_new_tokens=1, chunk_size=16)  # holds a (the one new token is never stored)
    assert cache.get_seq_length() == 37
    assert cache.next_positions(1, "cpu").tolist() == [37]
    again = generate(tiny, b, cache, max_new_tokens=12, chunk_size=16)
    assert again.sequences.tolist() == once.sequences.tolist()


def test_rewind_recomputes_from_the_first_difference(tiny):
    a, b, c = ids_of(30, 3), ids_of(10, 4), ids_of(12, 5)
    fresh = generate(tiny, torch.cat([a, c], 1), full(tiny), max_new_tokens=8)
    cache = full(tiny)
    generate(tiny, torch.cat([a, b], 1), cache, max_new_tokens=1)
    cache.rewind(30)
    assert cache.held_tokens() == 30 and cache.next_positions(1, "cpu").tolist() == [30]
    edited = generate(tiny, c, cache, max_new_tokens=8)
    assert edited.sequences.tolist() == fresh.sequences.tolist()


def test_continuing_with_another_batch_size_is_refused(tiny):
    cache = full(tiny)
    generate(tiny, ids_of(8, batch=2), cache, max_new_tokens=1)
    with pytest.raises(UsageError, match="holds 2 sequence"):
        generate(tiny, ids_of(8), cache, max_new_tokens=1)


def test_full_cache_request_checked_with_what_it_holds(tiny):
    cache = full(tiny, budget=40)
    generate(tiny, ids_of(30), cache, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"needs 43 KV tokens .*30 held \+ 10 prompt \+ 4 new - 1"):
        generate(tiny, ids_of(10), cache, max_new_tokens=4)
    assert cache.held_tokens() == 30  # nothing was written


def test_sampling_is_seeded_and_filters_reduce_to_greedy(tiny):
    ids = ids_of(20)
    greedy = generate(tiny, ids, full(tiny), max_new_tokens=10).sequences
    hot = Sampling(temperature=1.5, seed=7)
    one = generate(tiny, ids, full(tiny), max_new_tokens=10, sampling=hot).sequences
    two = generate(tiny, ids, full(tiny), max_new_tokens=10, sampling=hot).sequences
    assert one.tolist() == two.tolist()
    assert one.tolist() != greedy.tolist()  # a random tiny model at temperature 1.5 does not follow argmax
    for narrow in (Sampling(temperature=1.0, top_k=1, seed=1), Sampling(temperature=1.0, top_p=1e-6, seed=1)):
        assert generate(tiny, ids, full(tiny), max_new_tokens=10, sampling=narrow).sequences.tolist() == \
            greedy.tolist()
    state = torch.random.get_rng_state()
    generate(tiny, ids, full(tiny), max_new_tokens=3, sampling=hot)
    assert torch.equal(state, torch.random.get_rng_state())  # its own generator: the global RNG is untouched


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(top_k=1.5), dict(seed="x"), dict(temperature=True)])
def test_bad_sampling_settings(bad):
    with pytest.raises(UsageError, match=next(iter(bad))):
        Sampling(**bad)


def test_stop_token_ends_each_row_and_pads_after(tiny):
    ids = ids_of(12, batch=2, seed=9)
    plain = generate(tiny, ids, full(tiny), max_new_tokens=12).sequences
    stop = int(plain[0, 3])  # a token row 0 makes at step 3
    first_in = [next((i for i, t in enumerate(row) if t == stop), None) for row in plain.tolist()]
    gen = generate(tiny, ids, full(tiny), max_new_tokens=12, eos_token_id=stop)
    for r, at in enumerate(first_in):
        if at is None:
            assert gen.lengths[r] == 12 and gen.finish_reasons[r] == "length"
            continue
        assert gen.lengths[r] == at and gen.finish_reasons[r] == "stop"
        assert gen.row(r) == plain[r, :at].tolist()
        assert gen.sequences[r, at] == stop and not gen.sequences[r, at + 1:].any()


class CharTokenizer:
    """decode() maps each id to one character: enough to test stop strings without a real vocabulary."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(65 + i % 26) for i in ids)


def test_stop_string_across_tokens(tiny):
    ids = ids_of(15, seed=11)
    plain = generate(tiny, ids, full(tiny), max_new_tokens=16).sequences[0].tolist()
    text = CharTokenizer().decode(plain)
    target = text[5:7]  # two characters made by two tokens
    at = text.find(target)
    gen = generate(tiny, ids, full(tiny), max_new_tokens=16, stop_strings=[target], tokenizer=CharTokenizer())
    assert gen.finish_reasons == ["stop"] and gen.lengths == [at + 2]
    assert cut_at_stop(CharTokenizer().decode(gen.row(0)), [target]) == text[:at]


def test_stop_strings_need_a_tokenizer(tiny):
    with pytest.raises(UsageError, match="tokenizer"):
        generate(tiny, ids_of(5), full(tiny), stop_strings=["x"])


def test_on_token_streams_every_step_and_can_stop(tiny):
    ids = ids_of(10, seed=12)
    plain = generate(tiny, ids, full(tiny), max_new_tokens=9).sequences[0].tolist()
    seen = []
    generate(tiny, ids, full(tiny), max_new_tokens=9, on_token=lambda step, row: seen.append((step, row[0])))
    assert seen == list(enumerate(plain))
    seen.clear()
    gen = generate(tiny, ids, full(tiny), max_new_tokens=9,
                   on_token=lambda step, row: seen.append(step) or step == 3)
    assert seen == [0, 1, 2, 3] and gen.sequences[0, :4].tolist() == plain[:4]


def test_fed_tokens_say_what_the_cache_holds(tiny):
    ids = ids_of(10, seed=13)
    plain = generate(tiny, ids, full(tiny), max_new_tokens=8).sequences[0].tolist()
    cache = full(tiny)
    gen = generate(tiny, ids, cache, max_new_tokens=8)
    assert gen.fed_tokens == 7 and cache.held_tokens() == 10 + 7  # the last token is never fed
    cache = full(tiny)
    gen = generate(tiny, ids, cache, max_new_tokens=8, eos_token_id=plain[2])
    assert gen.lengths == [plain.index(plain[2])]
    assert cache.held_tokens() == 10 + gen.fed_tokens and gen.fed_tokens == gen.sequences.shape[1]


@pytest.mark.parametrize("message,oom", [("CUDA error: out of memory", True),
                                         ("CUDA error: an illegal memory access was encountered", False)])
def test_a_driver_allocation_that_fails_is_an_oom(tiny, monkeypatch, message, oom):
    """A CUDA driver allocation outside PyTorch's allocator (a stream, a graph) that fails is an OOM for the callers
    (torch.OutOfMemoryError, the original chained); any other driver error passes through as it was."""
    import importlib

    gen_mod = importlib.import_module("kvscope.runtime.generate")

    def fails(*args, **kwargs):
        raise torch.AcceleratorError(message)

    monkeypatch.setattr(gen_mod, "make_decoder", fails)
    ids = torch.randint(0, 256, (1, 8))
    with pytest.raises(torch.OutOfMemoryError if oom else torch.AcceleratorError) as caught:
        generate(tiny, ids, BudgetedCache(tiny, "full", budget_tokens=32), max_new_tokens=4)
    assert type(caught.value) is (torch.OutOfMemoryError if oom else torch.AcceleratorError)
    if oom:
        assert "out of memory" in str(caught.value) and isinstance(caught.value.__cause__, torch.AcceleratorError)
