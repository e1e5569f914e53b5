"""The small element-wise steps of a Llama decode step, one launch each on CUDA.

A decode step is bound by reading the weights (four matrix-vector products per layer); what sits between them is
element-wise work that transformers spreads over about 30 launches per layer (RMSNorm alone is six: cast, pow, mean,
add, rsqrt, two multiplies). Inside a CUDA graph a launch is cheap but not free (2 to 3 us each on an H200 for such
small tensors), so these functions do the same arithmetic in one launch each:

- `add_rmsnorm(residual, delta, weight, eps)`: residual += delta (in place, in the model dtype, as the model's own
  `residual + hidden`), then the model's RMSNorm of it.
- `rotate(q, k, cos, sin)`: RoPE on queries and keys, in place (the model's `q * cos + rotate_half(q) * sin`).
- `silu_mul(gate, up)`: the MLP's `silu(gate) * up`.

Each rounds where the model rounds (to the model dtype after every PyTorch op), so results agree with the model's own
forward to the last bit except where a reduction sums in another order (RMSNorm's mean). The PyTorch versions here
are the model's own formulas: they run on the CPU and wherever Triton cannot (KVSCOPE_TRITON=0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvscope.cache import fused


def add_rmsnorm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual [B, 1, N] (updated in place with + delta); returns RMSNorm(residual) * weight in its dtype."""
    ran, out = fused.run(residual, "kernels_triton.add_rmsnorm", residual, delta, weight, eps, module="runtime")
    if ran:
        return out
    if delta is not None:
        residual.add_(delta)
    x = residual.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(residual.dtype)


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q [B, Hq, 1, D] and k [B, Hkv, 1, D] with cos/sin [B, 1, D] (the model's rotary output)."""
    ran, out = fused.run(q, "kernels_triton.rotate", q, k, cos, sin, module="runtime")
    if ran:
        return out
    c, s = cos[:, None], sin[:, None]
    return (q * c) + (_rotate_half(q) * s), (k * c) + (_rotate_half(k) * s)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    ran, out = fused.run(gate, "kernels_triton.silu_mul", gate, up, module="runtime")
    if ran:
        return out
    return F.silu(gate) * up
