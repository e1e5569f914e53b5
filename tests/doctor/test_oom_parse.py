"""The doctor reads memory at the failure from PyTorch's OOM message (CPU test: a real message, no GPU needed)."""

from kvscope.doctor.diagnose import attribution
from kvscope.doctor.execute import AtFailure, Outcome, _at_failure

MESSAGE = ("CUDA out of memory. Tried to allocate 13.67 GiB. GPU 0 has a total capacity of 79.18 GiB of which 8.45 GiB "
           "is free. Including non-PyTorch memory, this process has 70.72 GiB memory in use. Of the allocated memory "
           "56.26 GiB is allocated by PyTorch, and 13.78 GiB is reserved by PyTorch but unallocated. If reserved but "
           "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
GIB = 1024**3


def test_figures_come_from_the_message(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 80 * GIB))
    f = _at_failure(RuntimeError(MESSAGE), None, "cuda")
    assert f.allocated == int(56.26 * GIB) and f.reserved == int(56.26 * GIB) + int(13.78 * GIB)
    assert f.tried_to_allocate == int(13.67 * GIB) and f.device_used == int(70.72 * GIB)


def test_attribution_at_failure_splits_memory():
    f = AtFailure(allocated=56 * GIB, reserved=70 * GIB, device_used=71 * GIB, tried_to_allocate=13 * GIB,
                  kv_bytes=2 * GIB)
    o = Outcome("oom", "x", 1.0, 56 * GIB, 70 * GIB, 0, 2 * GIB, at_failure=f)
    parts = attribution(o, weights=15 * GIB, capacity=80 * GIB)
    assert parts == {"weights": 15 * GIB, "kv_cache": 2 * GIB, "activations": 39 * GIB, "other": 1 * GIB,
                     "fragmentation": 14 * GIB}
