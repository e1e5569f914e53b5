"""kvscope's own Llama decode step: one token per row through every layer, on fixed shapes, with no host reads.

Why not the model's forward: transformers' forward runs about 40 launches per layer (six for each RMSNorm, ten for
RoPE) and Python logic per step (mask and position bookkeeping, the cache hooks). This step reads the same weights
from the model's own modules (`_compat.decode_weights`, no copy) and does the same arithmetic in about 12 launches
per layer: two RMSNorms and the SiLU product (kvscope.runtime.kernels), RoPE with the KV insert (kvscope.cache.static),
two for the fused decode attention; the rest are the model's matrix products. Every input lives in a fixed device buffer
(`tokens`, `positions`, the cache's queue pointer), so on CUDA the whole step is captured once in a CUDA graph and
replayed (kvscope.runtime.graphs); on the CPU it runs as is.

Shapes in comments: B rows, Hq query heads, H KV heads, D head_dim, N hidden, I intermediate, V vocabulary.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from kvscope.cache import static
from kvscope.cache.streams import side_stream
from kvscope.runtime.kernels import add_rmsnorm, silu_mul


def _linear(x: torch.Tensor, wb) -> torch.Tensor:
    return F.linear(x, wb[0], wb[1])


class SideStream:
    """Work of a step that nothing on its path reads before the step ends (a policy's observation: it writes only the
    policy's scores), on a second CUDA stream forked where the work is issued and joined at the step's end (`join`),
    so it overlaps the rest of the layer instead of waiting its turn. The observation of lru at a 2k budget runs on 8
    of the H200's 132 SMs for 9 us a layer: about 0.29 ms of a 5.3 ms step. On the CPU the work runs in place.

    The tensors the work reads are held until the join: the allocator may not hand their memory to later work of the
    step (the next layer's weights) while the second stream still reads it, in a capture as in an eager step."""

    def __init__(self, device):
        self.stream = side_stream(device)
        self.held: list[torch.Tensor] = []
        self.forked = False

    def __call__(self, fn, *tensors) -> None:
        if self.stream is None:
            return fn()
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))  # the step's device, not the default
        with torch.cuda.stream(self.stream):
            fn()
        self.held.extend(tensors)
        self.forked = True

    def join(self) -> None:
        """Only after a fork: in a capture, waiting on a stream the capture never forked to is an error."""
        if self.forked:
            try:
                torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
            finally:
                self.held.clear()
                self.forked = False

    def join_after_error(self) -> None:
        """A step that raised still joins, so that a capture it was part of can end and its own error (an OOM, for
        the doctor) comes out, not the capture's complaint of an unjoined stream; an error joining is dropped."""
        with contextlib.suppress(Exception):  # the step's own error is the one to raise
            self.join()


class DecodeStep:
    """The decode step of `weights` (a `_compat.DecodeWeights`) over the layers of one `BudgetedCache`."""

    def __init__(self, weights, cache, batch: int, device):
        self.w = weights
        self.layers = cache.layers
        self.ptr = cache.settings.queue_ptr
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)  # this step's input ids [B]
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)  # their true positions [B]
        self.side = SideStream(device)

    def __call__(self) -> torch.Tensor:
        """Logits [B, V] of the next token; inserts this step's tokens and advances positions and the queue."""
        w = self.w
        residual = F.embedding(self.tokens, w.embed)[:, None, :]  # [B, 1, N]
        cos, sin = w.rotary(residual, self.positions[:, None])  # [B, 1, D]
        try:
            delta = self._layers(residual, cos, sin)
        except BaseException:
            self.side.join_after_error()
            raise
        self.side.join()  # before the positions the observations read advance
        x = add_rmsnorm(residual, delta, w.norm, w.eps)
        self.positions.add_(1)
        self.ptr.add_(1)
        return _linear(x[:, 0], w.lm_head)  # [B, V]

    def _layers(self, residual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Every layer of the step on `residual` [B, 1, N] (updated in place); the last layer's MLP output."""
        w = self.w
        b = self.tokens.shape[0]
        delta = None
        nq, nk = w.heads * w.head_dim, w.kv_heads * w.head_dim
        for layer, lw in zip(self.layers, w.layers):
            x = add_rmsnorm(residual, delta, lw.input_norm, w.eps)
            if lw.qkv is not None:  # one product, then views of its three parts
                qkv = F.linear(x, lw.qkv)  # [B, 1, Nq + 2 Nk]
                q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
            else:
                q, k, v = _linear(x, lw.q), _linear(x, lw.k), _linear(x, lw.v)
            q = q.view(b, 1, w.heads, w.head_dim).transpose(1, 2)  # [B, Hq, 1, D]
            k = k.view(b, 1, w.kv_heads, w.head_dim).transpose(1, 2)  # [B, H, 1, D]
            v = v.view(b, 1, w.kv_heads, w.head_dim).transpose(1, 2)
            slot = static.insert(layer, k, v, self.positions, self.ptr, rope=(q, cos, sin))  # RoPE in place
            attn = static.attend(layer, q, slot, self.positions, w.scaling, defer=self.side)  # [B, Hq, 1, D]
            o = _linear(attn.transpose(1, 2).reshape(b, 1, w.heads * w.head_dim), lw.o)
            x = add_rmsnorm(residual, o, lw.post_norm, w.eps)
            if lw.gate_up is not None:
                gu = F.linear(x, lw.gate_up)  # [B, 1, 2I]
                half = gu.shape[-1] // 2
                delta = _linear(silu_mul(gu[..., :half], gu[..., half:]), lw.down)
            else:
                delta = _linear(silu_mul(_linear(x, lw.gate), _linear(x, lw.up)), lw.down)
        return delta
