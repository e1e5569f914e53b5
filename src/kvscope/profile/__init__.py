"""Profile a generation with `torch.profiler`: per-layer and per-phase ranges, NVTX for Nsight Systems, a Chrome trace,
a TensorBoard log directory and a summary (top operators by time and memory, time per layer, prefill vs decode).

>>> from kvscope.profile import profile_workload
>>> result = profile_workload(model, ids, None, max_new_tokens=8, out_dir="prof")   # doctest: +SKIP
"""

from kvscope.profile.profiler import ProfileResult, profile_workload, warm_up

__all__ = ["ProfileResult", "profile_workload", "warm_up"]
