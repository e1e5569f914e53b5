"""`profile_workload`: one generation under `torch.profiler`, with named ranges per decoder layer and per phase.

    result = profile_workload(model, ids, None, max_new_tokens=16, out_dir="prof")
    result.phases        # {"prefill_seconds": ..., "decode_seconds": ...}
    result.layers[0]     # {"layer": 0, "calls": 16, "total_ms": ..., "self_ms": ..., ...}

With `cache=None` the workload is plain `transformers` `model.generate()` with its default cache (runtime "hf");
with a cache (a `BudgetedCache` normally) it is kvscope's runtime: chunked prefill into that cache, then greedy
decode. Both decode greedily for exactly `max_new_tokens` tokens (end-of-sequence does not stop them), so two runs of
the same workload are comparable. The profile records shapes and memory; on CUDA it records kernels too.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kvscope.errors import usage
from kvscope.monitor import Phases
from kvscope.planner.workload import DEFAULT_CHUNK, prefill_chunk
from kvscope.profile import summary
from kvscope.profile.outputs import prepare_out_dir, write_traces
from kvscope.profile.ranges import PhaseMarker, layer_ranges
from kvscope.runtime.generate import PhaseCallback, generate


@dataclass
class ProfileResult:
    """What a profile measured and where it was written. `to_dict()` is the CLI's JSON payload."""

    trace: str  # Chrome trace (chrome://tracing, https://ui.perfetto.dev)
    tensorboard_dir: str  # `tensorboard --logdir` this (needs the torch-tb-profiler plugin)
    tensorboard_file: str
    runtime: str  # "hf" (model.generate) or "kvscope" (kvscope.runtime.generate)
    device: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    num_layers: int
    nvtx: bool
    wall_seconds: float
    phases: dict[str, float]
    layers: list[dict[str, Any]]
    top_ops_time: list[dict[str, Any]]
    top_ops_memory: list[dict[str, Any]]
    sort_keys: dict[str, str] = field(default_factory=dict)  # which column ordered each top-operator list

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def profile_workload(model, input_ids: torch.Tensor, cache=None, *, max_new_tokens: int = 16,
                     chunk_size: int = DEFAULT_CHUNK, out_dir: str | os.PathLike, nvtx: bool = False, top: int = 15,
                     attention_mask: torch.Tensor | None = None, on_phase: PhaseCallback | None = None,
                     run_name: str | None = None) -> ProfileResult:
    """Profile one greedy generation of `max_new_tokens` tokens from `input_ids` [batch, prompt] and write the traces.

    `cache=None` profiles `model.generate()` with its default cache; a cache profiles kvscope's runtime with it
    (`chunk_size` is that runtime's prefill chunk). `nvtx=True` adds NVTX ranges for Nsight Systems (CUDA only).
    Ranges: `kvscope/prefill`, `kvscope/decode` and `kvscope/layer_<i>` around every decoder layer's forward.
    The TensorBoard run is `run_name` (default: the runtime). Raises `UsageError` for bad arguments.

    >>> r = profile_workload(model, ids, None, max_new_tokens=8, out_dir="prof")   # doctest: +SKIP
    >>> r.trace, r.phases["decode_seconds"], len(r.layers)                         # doctest: +SKIP
    """
    device = next(model.parameters()).device
    _check(input_ids, max_new_tokens, chunk_size, top, nvtx, device)
    out = prepare_out_dir(out_dir)
    runtime = "hf" if cache is None else "kvscope"
    ids = input_ids.to(device)
    mask = (attention_mask if attention_mask is not None else torch.ones_like(ids)).to(device)
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    marker = PhaseMarker(nvtx, torch.cuda.synchronize if cuda else None)

    start = time.perf_counter()
    # acc_events: one profiling cycle here; without it torch warns that events of earlier cycles are dropped
    with torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True,
                                acc_events=True) as prof, layer_ranges(model, nvtx) as num_layers:
        try:
            if cache is None:
                _generate_hf(model, ids, mask, max_new_tokens, marker, on_phase)
            else:
                _generate_kvscope(model, ids, mask, cache, max_new_tokens, chunk_size, marker, on_phase)
        finally:
            marker.close()
    wall = time.perf_counter() - start

    trace, tb_file = write_traces(prof, out, run_name or runtime)
    events = prof.events()
    operators = summary.operator_rows(prof.key_averages())
    time_key, memory_key = ("self_device_ms", "self_device_memory_bytes") if cuda else ("self_cpu_ms",
                                                                                         "self_cpu_memory_bytes")
    return ProfileResult(
        trace=str(trace), tensorboard_dir=str(out / "tensorboard"), tensorboard_file=str(tb_file), runtime=runtime,
        device=str(device), batch=int(ids.shape[0]), prompt_tokens=int(ids.shape[1]), new_tokens=max_new_tokens,
        num_layers=num_layers, nvtx=nvtx, wall_seconds=round(wall, 6), phases=summary.phase_seconds(events),
        layers=summary.layer_rows(events, num_layers, device=cuda),
        top_ops_time=summary.top_by_time(operators, top, cuda),
        top_ops_memory=summary.top_by_memory(operators, top, cuda),
        sort_keys={"top_ops_time": time_key, "top_ops_memory": memory_key},
    )


def warm_up(model, input_ids: torch.Tensor, cache=None, *, chunk_size: int = DEFAULT_CHUNK,
            attention_mask: torch.Tensor | None = None, new_tokens: int = 2) -> None:
    """Run the workload briefly without the profiler, so one-time costs (allocator growth, library and kernel
    initialisation) stay out of the profile. Give it a throwaway cache, never the one to be profiled."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    mask = (attention_mask if attention_mask is not None else torch.ones_like(ids)).to(device)
    marker = PhaseMarker()  # no profiler is running: its ranges cost nothing and record nothing
    if cache is None:
        _generate_hf(model, ids, mask, new_tokens, marker, None)
    else:
        _generate_kvscope(model, ids, mask, cache, new_tokens, chunk_size, marker, None)
    marker.close()
    if device.type == "cuda":
        torch.cuda.synchronize()


def _check(input_ids, max_new_tokens: int, chunk_size: int, top: int, nvtx: bool, device: torch.device) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise usage(f"the prompt is empty (input_ids of shape {tuple(input_ids.shape)})",
                    expected="input_ids of shape [batch, tokens] with at least one token", fix="--prompt or --context")
    for name, value, option in (("max_new_tokens", max_new_tokens, "--max-new-tokens"),
                                ("chunk_size", chunk_size, "--chunk-size"), ("top", top, "--top")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise usage(f"{name} must be a positive integer, got {value!r}", fix=option)
    if nvtx and device.type != "cuda":
        raise usage(f"NVTX ranges were asked for, but the model runs on {device.type}",
                    expected="a CUDA device: NVTX ranges are read by Nsight Systems next to GPU kernels",
                    fix="--device cuda, or drop --nvtx")


def _phases(ids, max_new_tokens: int, chunk_size: int | None, marker: PhaseMarker,
            on_phase: PhaseCallback | None) -> Phases:
    """The generation's phases (kvscope.monitor.Phases) as the profile's ranges, and as progress for `on_phase`."""
    chunk = prefill_chunk(ids.shape[0], chunk_size) if chunk_size else None  # what generate() feeds per forward
    return Phases(ids.shape[1], max_new_tokens, chunk=chunk, batch=ids.shape[0],
                  on_start=lambda name, detail: marker.enter(name), on_progress=on_phase)


def _generate_hf(model, ids, mask, max_new_tokens: int, marker: PhaseMarker, on_phase: PhaseCallback | None) -> None:
    phases = _phases(ids, max_new_tokens, None, marker, on_phase)
    phases.begin()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                       eos_token_id=None, logits_processor=[phases.logits_processor()])


def _generate_kvscope(model, ids, mask, cache, max_new_tokens: int, chunk_size: int, marker: PhaseMarker,
                      on_phase: PhaseCallback | None) -> None:
    phases = _phases(ids, max_new_tokens, chunk_size, marker, on_phase)
    phases.begin()
    generate(model, ids, cache, attention_mask=mask, max_new_tokens=max_new_tokens, chunk_size=chunk_size,
             on_phase=phases)
