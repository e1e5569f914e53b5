"""kvscope's own generation loop: chunked prefill into a preallocated cache, then greedy decode.

Why not only `model.generate()`: `generate` prefills the whole prompt in one forward, so activations and logits scale
with the prompt even when the cache is bounded. Here the prompt goes through the model `chunk_size` tokens at a time
and only the last position's logits are computed, so the peak is weights + cache (budget + one chunk) + one chunk of
activations, whatever the prompt length. Phases are reported to an optional callback (the monitor marks them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvscope import _compat
from kvscope.errors import usage

PhaseCallback = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class Generation:
    sequences: torch.Tensor  # [B, new_tokens] generated ids (eos and what follows it are padding)
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    first_token_logits: torch.Tensor | None = field(default=None, repr=False)

    @property
    def decode_tokens_per_second(self) -> float | None:
        steps = self.new_tokens - 1  # the first new token comes out of prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else None


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """True positions for left-padded rows: real tokens count from 0; pads get 0 (they are never stored)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, cache, *, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int = 32, chunk_size: int = 512, eos_token_id: int | list[int] | None = None,
             on_phase: PhaseCallback | None = None, keep_first_logits: bool = False) -> Generation:
    """Greedy generation with chunked prefill. `cache` is any transformers Cache (a `BudgetedCache` normally)."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise usage("the prompt is empty", expected="at least one token", fix="--prompt")
    if max_new_tokens < 1:
        raise usage(f"max_new_tokens must be >= 1, got {max_new_tokens}", fix="--max-new-tokens")
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    mask = (attention_mask if attention_mask is not None else torch.ones_like(ids)).to(device)
    positions = positions_from_mask(mask)
    key = _compat.cache_keyword(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = ids.shape[1]

    start = time.perf_counter()
    logits = None
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        out = model(input_ids=ids[:, s:e], attention_mask=mask[:, :e], position_ids=positions[:, s:e],
                    use_cache=True, logits_to_keep=1, **{key: cache})
        logits = out.logits[:, -1]
        if on_phase:
            on_phase("prefill", e, n)
    sync()
    prefill_s = time.perf_counter() - start
    first = logits.float().clone() if keep_first_logits else None

    eos = torch.tensor(_as_list(eos_token_id), device=device)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    tokens, pos = [], positions[:, -1:] + 1
    start = time.perf_counter()
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)
        nxt = torch.where(finished, torch.zeros_like(nxt), nxt)
        tokens.append(nxt)
        if eos.numel():
            finished |= torch.isin(nxt, eos)
        if step == max_new_tokens - 1 or (eos.numel() and bool(finished.all())):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **{key: cache})
        logits, pos = out.logits[:, -1], pos + 1
        if on_phase:
            on_phase("decode", step + 1, max_new_tokens)
    sync()
    decode_s = time.perf_counter() - start
    seq = torch.stack(tokens, dim=1)
    return Generation(sequences=seq, prompt_tokens=n, new_tokens=seq.shape[1], prefill_seconds=prefill_s,
                      decode_seconds=decode_s, first_token_logits=first)


def _as_list(eos) -> list[int]:
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
