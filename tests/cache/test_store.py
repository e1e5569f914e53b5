"""A store's slot gather: with a plain [B, H, n] index, or one already expanded over the trailing dims."""

from __future__ import annotations

import pytest
import torch

from kvscope.cache.store import gather_slots


def test_an_expanded_index_gathers_what_the_plain_one_does():
    t = torch.randn(2, 3, 10, 4)
    slots = torch.randint(0, 10, (2, 3, 5))
    expanded = slots[..., None].expand(2, 3, 5, 4)
    out = torch.empty(2, 3, 5, 4)
    assert torch.equal(gather_slots(t, expanded, out=out), gather_slots(t, slots))
    assert torch.equal(out[0, 1, 2], t[0, 1, slots[0, 1, 2]])


def test_an_index_expanded_over_fewer_trailing_elements_is_refused():
    t = torch.randn(2, 3, 10, 4)
    short = torch.zeros(2, 3, 5, 2, dtype=torch.long)  # torch.gather would take it and return half of each slot
    with pytest.raises(ValueError, match=r"\[\.\.\., n, 4\]"):
        gather_slots(t, short)
