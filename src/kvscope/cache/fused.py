"""Dispatch to kvscope's fused Triton kernels, with the PyTorch path as the fallback.

On CUDA, when Triton is installed, the stores' per-step work (kvscope.cache.quant_triton) and the decode attention
(kvscope.cache.attention_triton) run as fused kernels: decoding is bound by the CPU cost of launching PyTorch ops,
and the eager versions take 10 to 20 of them per layer. `KVSCOPE_TRITON=0` forces the eager path everywhere. A kernel
that fails (a broken Triton toolchain) disables Triton for the process, with a warning; nothing has been written then,
since a launch fails before it runs.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

USE_TRITON = os.environ.get("KVSCOPE_TRITON", "1") != "0"
# the fused decode attention alone (the stores' kernels stay on): `KVSCOPE_FUSED_DECODE=0` measures what it buys
DECODE_ATTENTION = os.environ.get("KVSCOPE_FUSED_DECODE", "1") != "0"
_STATE = {"broken": False, "ran": set()}  # "ran": kernels that ran at least once (tests check the fused path ran)


def available(t: torch.Tensor) -> bool:
    """Whether fused kernels may run for tensors on `t`'s device (they launch on the current device only)."""
    return USE_TRITON and t.is_cuda and not _STATE["broken"] and t.device.index == torch.cuda.current_device()


def run(t: torch.Tensor, kernel: str, *args, module: str = "cache") -> tuple[bool, object]:
    """(True, result) when `kernel` ("module.function" under kvscope.<module>) ran for tensors on `t`'s device;
    (False, None) means: do it eagerly."""
    if not available(t):
        return False, None
    name, function = kernel.rsplit(".", 1)
    try:
        result = getattr(importlib.import_module(f"kvscope.{module}.{name}"), function)(*args)
    except torch.OutOfMemoryError:
        raise  # a real OOM, for the caller (and the doctor) to see: the eager path would need more memory, not less
    except Exception as exc:  # noqa: BLE001 - fall back to the eager path, whatever broke
        warnings.warn(f"kvscope: fused KV kernels disabled ({type(exc).__name__}: {exc}); using PyTorch ops",
                      RuntimeWarning, stacklevel=3)
        _STATE["broken"] = True
        return False, None
    _STATE["ran"].add(kernel)
    return True, result


def ran(kernel: str) -> bool:
    return kernel in _STATE["ran"]
