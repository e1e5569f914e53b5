"""Tensor parallel on the CPU: two gloo ranks on a tiny random Llama, sharded by transformers' own plan, against the
same model unsharded in this process. (gloo is for tests: `--tp` on the CPU needs KVSCOPE_ALLOW_GLOO=1.)"""

from __future__ import annotations

import json
import time

import pytest

from kvscope.distributed import RankFailure, check_tp, launch
from kvscope.errors import DoesNotFit, UsageError
from kvscope.models.spec import ModelSpec
from tests.conftest import TINY
from tests.distributed import jobs

POLICIES = {"lru": {}, "snapkv": {"window": 4, "kernel": 3}}


@pytest.fixture
def config_dir(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(TINY))
    return str(tmp_path / "tiny")


def _single_process(model_ref: str, job: dict) -> dict:
    from kvscope.distributed.ranks import kept_positions
    from kvscope.models import load
    from kvscope.runtime.session import run_prompt

    loaded = load(model_ref, random_weights=True, dtype="fp32", device="cpu")
    out = {}
    for policy, knobs in job["policies"].items():
        r = run_prompt(loaded.model, None, ids=job["ids"], policy=policy, knobs=knobs, budget_tokens=job["budget"],
                       new_tokens=job["new_tokens"], chunk_size=job["chunk_size"], keep_cache=True)
        out[policy] = {"tokens": r.generation.sequences.tolist(), "kept": kept_positions(r.cache)}
    return out


def test_two_ranks_generate_and_evict_exactly_as_one_process(config_dir):
    from kvscope.runtime.session import random_ids

    job = {"model": config_dir, "ids": random_ids(TINY["vocab_size"], 40), "policies": POLICIES, "budget": 12,
           "new_tokens": 10, "chunk_size": 16}
    ranks = launch(jobs.kept_by_policy, job, 2, backend="gloo", timeout_s=120)
    single = _single_process(config_dir, job)
    spec = ModelSpec.from_hf_config(TINY)
    local = TINY["num_key_value_heads"] // 2
    for policy in POLICIES:
        for r in ranks:  # greedy tokens (fp32 on the CPU) equal the unsharded model's on every rank
            assert r["policies"][policy]["tokens"] == single[policy]["tokens"]
        for layer, rows in enumerate(single[policy]["kept"]):
            for b, heads in enumerate(rows):
                for head, kept in enumerate(heads):  # the rank holding this KV head kept exactly these positions
                    owner = ranks[head // local]["policies"][policy]["kept"][layer][b][head % local]
                    assert owner == kept and len(kept) == job["budget"]
    lru = [r["policies"]["lru"]["kept"] for r in ranks]
    assert lru[0] == lru[1]  # a position-only policy keeps the same positions on every rank
    for r in ranks:  # each rank holds what the planner says one GPU holds (transformers' plan, this version)
        assert r["weights_bytes"] == spec.weights_bytes("fp32", tp=2)


@pytest.mark.parametrize("kind, error", [("usage", UsageError), ("oom", DoesNotFit)])
def test_a_failing_rank_stops_the_group_and_reaches_the_parent(kind, error):
    start = time.monotonic()
    with pytest.raises(error) as caught:
        launch(jobs.fail_on_last_rank, kind, 2, backend="gloo", timeout_s=90)
    assert "rank 1 of 2" in caught.value.cli_text
    assert time.monotonic() - start < 80  # stopped by the launcher, not by the collective's 90 s timeout
    if kind == "oom":
        assert "out of GPU memory" in caught.value.cli_text and "--tp" in caught.value.cli_text


def test_check_tp_refuses_what_cannot_run(monkeypatch):
    import torch

    spec = ModelSpec.from_catalogue("llama-3.1-70b")  # 64 heads, 8 KV heads
    assert check_tp(1, spec, "cpu") is None
    monkeypatch.delenv("KVSCOPE_ALLOW_GLOO", raising=False)
    with pytest.raises(UsageError, match="for kvscope's own tests only"):
        check_tp(2, spec, "cpu")
    monkeypatch.setenv("KVSCOPE_ALLOW_GLOO", "1")
    assert check_tp(2, spec, "cpu") == "gloo"
    with pytest.raises(UsageError, match="does not divide the 64 attention heads"):
        check_tp(3, spec, "cpu")
    with pytest.raises(UsageError, match="KV heads"):
        check_tp(16, spec, "cpu")  # 64 heads split 16 ways, but 8 KV heads cannot
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match="needs 2 GPUs, but this machine has 1"):
        check_tp(2, spec, "cuda")
    for bad in (0, -2, True):
        with pytest.raises(UsageError):
            check_tp(bad, spec, "cpu")
    assert not isinstance(RankFailure("x"), UsageError)
