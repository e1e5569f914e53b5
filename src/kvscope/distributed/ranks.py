"""What runs inside one rank: the process group and device mesh, the model sharded by transformers' plan, and the
jobs kvscope runs there (`run_job`: one prompt under a budgeted cache on this rank's KV heads)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass
class RankContext:
    rank: int
    world: int
    backend: str
    device: torch.device
    mesh: object  # torch.distributed.device_mesh.DeviceMesh, 1-D over every rank


def setup(backend: str, timeout_s: int) -> RankContext:
    """Join the process group the launcher set up (RANK, WORLD_SIZE, MASTER_ADDR/PORT) and build the 1-D mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if backend == "nccl":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), device_id=device if backend == "nccl"
                            else None)
    mesh = init_device_mesh(device.type, (world,))
    return RankContext(rank, world, backend, device, mesh)


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def load_sharded(ctx: RankContext, ref: str, *, random_weights: bool, dtype: str | None, seed: int = 0):
    """This rank's `LoadedModel`: a local directory through `from_pretrained(tp_plan="auto")`; random weights built
    from the same seed on every rank and sharded with the model's plan (on the CPU, so the weights equal an unsharded
    run's), or drawn shard by shard on the GPU (a 70B shape never exists whole on one device)."""
    from kvscope import _compat
    from kvscope.models import catalogue
    from kvscope.models.loader import LoadedModel, load, resolve_dtype
    from kvscope.models.spec import ModelSpec

    _compat.quiet_transformers()
    torch_dtype = resolve_dtype(dtype, ctx.device.type)
    if not random_weights:
        from kvscope.models.loader import model_directory

        path, name = model_directory(ref)
        model = _compat.from_pretrained_tensor_parallel(str(path), torch_dtype, ctx.mesh)
        tokenizer = _compat.tokenizer_from_pretrained(str(path)) if _has_tokenizer(path) else None
        return LoadedModel(model, tokenizer, ModelSpec.from_config_file(path, name=name))
    if ctx.device.type == "cpu":
        loaded = load(ref, random_weights=True, dtype=dtype, device="cpu", seed=seed)
        _compat.apply_tensor_parallel(loaded.model, ctx.mesh)
        return loaded
    entry = catalogue.catalogue_entry(ref) if catalogue.is_catalogue_name(ref) else None
    values = entry.config if entry else _compat_config(ref)
    model = _compat.build_random_model(values, torch_dtype, "meta")
    _compat.apply_tensor_parallel(model, ctx.mesh)
    torch.manual_seed(seed + ctx.rank)
    _compat.random_shards(model, ctx.device)
    spec = ModelSpec.from_hf_config(values, name=entry.name if entry else str(ref))
    return LoadedModel(model.eval(), None, spec)


def _compat_config(ref: str) -> dict:
    from kvscope.models.loader import _config_values

    return _config_values(ref)


def _has_tokenizer(path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def memory(ctx: RankContext, model) -> dict:
    """This rank's bytes: its weight shards (as held), and on CUDA the allocator's peak."""
    from kvscope import _compat

    weights = sum(_compat.local_tensor(p).numel() * p.element_size() for p in model.parameters())
    out = {"weights_bytes": weights}
    if ctx.device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(ctx.device)
        out["allocated_bytes"] = torch.cuda.memory_allocated(ctx.device)
    return out


def kept_positions(cache) -> list[list[list[list[int]]]]:
    """Per layer, sequence and local KV head: the sorted positions the cache holds (what eviction kept)."""
    out = []
    for layer in cache.layers:
        st = layer.state
        rows = []
        for b in range(st.valid.shape[0]):
            rows.append([sorted(st.position[b, h][st.valid[b, h]].tolist()) for h in range(st.valid.shape[1])])
        out.append(rows)
    return out


def run_job(ctx: RankContext, job: dict) -> dict:
    """One prompt under a budgeted cache on this rank's shard (the work of `kvscope run --tp N`); the prompt ids come
    in the job, the same on every rank. Returns this rank's figures and, with `job["kept"]`, its kept positions."""
    from kvscope import _compat
    from kvscope.runtime.session import run_prompt

    loaded = load_sharded(ctx, job["model"], random_weights=job["random_weights"], dtype=job["dtype"])
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    ids = job.get("ids")
    start = time.perf_counter()
    result = run_prompt(loaded.model, loaded.tokenizer, job.get("text"), ids=ids, chat=job.get("chat", True),
                        policy=job["policy"], knobs=job.get("knobs") or {}, budget_tokens=job.get("budget"),
                        kv_dtype=job.get("kv_dtype"), new_tokens=job["new_tokens"], chunk_size=job["chunk_size"],
                        recall=job.get("recall"), keep_cache=True)
    _, heads, kv_heads, _ = _compat.attention_heads(loaded.model)
    out = {"rank": ctx.rank, "world": ctx.world, "device": str(ctx.device), "query_heads": heads,
           "kv_heads": kv_heads, "first_kv_head": ctx.rank * kv_heads, "seconds": time.perf_counter() - start,
           "result": result.to_dict(), "tokens": result.generation.sequences.tolist(), "spec": loaded.spec.name,
           **memory(ctx, loaded.model)}
    if job.get("kept"):
        out["kept"] = kept_positions(result.cache)
    return out
