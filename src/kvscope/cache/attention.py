"""The eager attention of a `BudgetedLayer` (PyTorch SDPA over the layer's slots), the reference the fused kernels
(kvscope.cache.attention_triton) are tested against: causal attention of a chunk at the end of its slots, attention
under the layer's own slot mask with the query heads of a KV head side by side (GQA without repeating KV), and the
attention weights a policy observes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_queries(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, n, D] -> [B, Hkv, g*n, D]: the query heads sharing a KV head side by side (no KV repeat needed)."""
    b, hq, n, d = query.shape
    return query.reshape(b, kv_heads, (hq // kv_heads) * n, d)


def grouped_mask(mask: torch.Tensor, group: int) -> torch.Tensor:
    """[B, H, n, S] -> [B, H, g*n, S]: the mask of `grouped_queries`' rows."""
    b, h, n, s = mask.shape
    return mask[:, :, None].expand(b, h, group, n, s).reshape(b, h, group * n, s)


def chunk_visible(real: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Bool [B, end - start, n]: which of a chunk's n tokens its query rows [start, end) see, in causal order; a
    padding token (`real` [B, n] false) is seen only by its own query."""
    n = real.shape[-1]
    q = torch.arange(start, end, device=real.device)[:, None]
    k = torch.arange(n, device=real.device)[None, :]
    return ((k <= q)[None] & real[:, None, :]) | (k == q)[None]


def causal_attention(query, keys, values, scaling) -> torch.Tensor:
    """Attention of the last n slots' queries [B, Hq, n, D] over keys/values [B, H, S, D], each query seeing every
    slot up to its own (causal, aligned to the end): no mask is built (SDPA's lower-right causal bias, GQA native)."""
    from torch.nn.attention.bias import causal_lower_right

    n, s = query.shape[2], keys.shape[2]
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=causal_lower_right(n, s), scale=scaling,
                                          enable_gqa=query.shape[1] != keys.shape[1])


def grouped_attention(query, keys, values, mask, scaling) -> torch.Tensor:
    b, hq, n, d = query.shape
    h = keys.shape[1]
    out = F.scaled_dot_product_attention(grouped_queries(query, h), keys, values, attn_mask=grouped_mask(mask, hq // h),
                                         scale=scaling)
    return out.reshape(b, hq, n, d)


def attention_weights(query, keys, mask, scaling) -> torch.Tensor:
    """Softmax attention [B, Hkv, n, S], averaged over the query heads of each KV head, computed in fp32."""
    b, hq, n, _ = query.shape
    h = keys.shape[1]
    g = hq // h
    logits = (grouped_queries(query, h).float() @ keys.float().transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~grouped_mask(mask, g), float("-inf"))
    return logits.softmax(-1).reshape(b, h, g, n, -1).mean(2)
