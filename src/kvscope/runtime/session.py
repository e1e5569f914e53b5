"""One prompt through a budgeted cache, with everything a user wants to see afterwards (the library call behind
`kvscope run`), and the checks any caller makes before it allocates a cache: the model's positions, a budget clamped
to the sequence, and the cache's bytes against the device's free memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kvscope.cache import BudgetedCache, CacheStats
from kvscope.errors import does_not_fit, usage
from kvscope.runtime.generate import Generation, PhaseCallback, generate


@dataclass
class RunResult:
    text: str
    generation: Generation
    stats: CacheStats
    budget_note: str | None
    recall: str | None = None
    recalled_tokens: int = 0  # what the recall tier brought back (the most in any layer and row)

    def to_dict(self) -> dict:
        g, s = self.generation, self.stats
        return {
            "text": self.text,
            "prompt_tokens": g.prompt_tokens,
            "new_tokens": g.new_tokens,
            "cached_new_tokens": g.fed_tokens,
            "policy": s.policy,
            "kv_dtype": s.kv_dtype,
            "budget_tokens": s.budget_tokens,
            "budget_note": self.budget_note,
            "recall": self.recall,
            "recalled_tokens": self.recalled_tokens,
            "layers": [{"layer": x.layer, "stored_tokens": x.stored_tokens, "evicted_tokens": x.evicted_tokens,
                        "bytes": x.bytes} for x in s.layers],
            "evicted_tokens_total": s.evicted_tokens,
            "kv_bytes_total": s.bytes,
            "prefill_seconds": round(g.prefill_seconds, 4),
            "decode_seconds": round(g.decode_seconds, 4),
            "decode_tokens_per_second": g.decode_tokens_per_second,
        }


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The prompt text from `--prompt` or `--prompt-file`; empty or missing input is a `UsageError`."""
    if prompt_file is not None:
        path = Path(prompt_file).expanduser()
        if not path.is_file():
            raise usage(f"prompt file not found: {path}", fix="--prompt-file")
        try:
            prompt = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise usage(f"cannot read prompt file {path}: {exc}", expected="a UTF-8 text file",
                        fix="--prompt-file") from None
    if prompt is None or not prompt.strip():
        raise usage("the prompt is empty", expected="some text", fix="--prompt or --prompt-file")
    return prompt


def encode(tokenizer, text: str, chat: bool = True) -> torch.Tensor:
    """Token ids [1, n]; with `chat`, the tokenizer's chat template is applied as one user turn."""
    if tokenizer is None:
        raise usage("this model has no tokenizer, so it cannot take a text prompt",
                    expected="a model directory with tokenizer files, a .gguf, or smollm2-135m",
                    fix="--context N (N random token ids), or MODEL")
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_dict=True, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise usage("the prompt encodes to no tokens", fix="--prompt")
    return ids


def random_ids(vocab_size: int, length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """`length` random token ids per row (for shape-only runs without a tokenizer)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


def check_positions(prompt_tokens: int, new_tokens: int, max_positions: int) -> None:
    """prompt + new - 1 positions (the last new token is never fed back) must stay within the model's."""
    need = prompt_tokens + new_tokens - 1
    if need > max_positions:
        raise usage(f"a prompt of {prompt_tokens} tokens + {new_tokens} new tokens needs {need} positions, but the "
                    f"model supports {max_positions}", expected=f"prompt + new tokens - 1 <= {max_positions}",
                    fix="--prompt, --prompt-file, --context or --new-tokens")


def cache_budget(budget_tokens: int | None, kv_tokens: int) -> tuple[int, str | None]:
    """The budget to allocate, and a note when it is not the one asked for: none given, or more than the sequence
    can use (a cache is never larger than prompt + new - 1 tokens, whatever the budget)."""
    if budget_tokens is None:
        return kv_tokens, f"no --budget: sized to the whole sequence ({kv_tokens} tokens), nothing evicted"
    if budget_tokens > kv_tokens:
        return kv_tokens, (f"--budget {budget_tokens} is more than the {kv_tokens} KV tokens this sequence needs: the "
                           f"cache was sized to {kv_tokens} tokens (nothing is evicted)")
    return budget_tokens, None


def check_cache_fits(model, *, batch: int, prompt_tokens: int, new_tokens: int, budget_tokens: int,
                     kv_dtype: str | None, chunk_size: int) -> None:
    """Refuse, before allocating it, a cache larger than the device's free memory (the planner prices it exactly)."""
    from kvscope.kvformats import normalize_dtype
    from kvscope.models.spec import ModelSpec
    from kvscope.planner.memory import kv_bytes
    from kvscope.planner.sizes import format_bytes
    from kvscope.planner.workload import Workload

    param = next(model.parameters())
    dtype = normalize_dtype(str(param.dtype))
    w = Workload(batch=batch, context=prompt_tokens, new_tokens=new_tokens, dtype=dtype, kv_dtype=kv_dtype,
                 runtime="kvscope", budget_tokens=budget_tokens, chunk_size=chunk_size)
    need = kv_bytes(ModelSpec.from_hf_config(model.config), w)
    free = free_memory(param.device)
    if need > free:
        raise does_not_fit(f"the KV cache would allocate {format_bytes(need)} ({budget_tokens} tokens + one "
                           f"{min(chunk_size, prompt_tokens)}-token chunk per sequence, batch {batch}), but "
                           f"{param.device} has {format_bytes(free)} free", expected="a cache that fits the device",
                           fix="--budget, --kv-dtype, --context or the prompt")


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`: CUDA's free memory plus what PyTorch holds unallocated, or the
    host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    import psutil

    return psutil.virtual_memory().available


def run_prompt(model, tokenizer, text: str | None = None, *, ids: torch.Tensor | None = None, chat: bool = True,
               policy: str = "lru", knobs: dict | None = None, budget_tokens: int | None = None,
               kv_dtype: str | None = None, new_tokens: int = 64, chunk_size: int = 512,
               on_phase: PhaseCallback | None = None, recall: str | None = None) -> RunResult:
    """Generate greedily for one prompt (`text`, or token `ids` [1, n]) under a `BudgetedCache`. The cache is sized to
    `budget_tokens`, at most the whole sequence; without a budget it holds the whole sequence, so nothing is evicted
    (and `full` works). Generation stops at end-of-sequence or after `new_tokens`."""
    if ids is None:
        ids = encode(tokenizer, text, chat)
    n = ids.shape[1]
    check_positions(n, new_tokens, int(model.config.max_position_embeddings))
    budget, note = cache_budget(budget_tokens, n + new_tokens - 1)
    check_cache_fits(model, batch=ids.shape[0], prompt_tokens=n, new_tokens=new_tokens, budget_tokens=budget,
                     kv_dtype=kv_dtype, chunk_size=chunk_size)
    cache = BudgetedCache(model, policy, budget_tokens=budget, kv_dtype=kv_dtype, chunk_size=chunk_size,
                          recall=recall, **(knobs or {}))
    eos_ids = _eos(tokenizer, model)
    gen = generate(model, ids, cache, max_new_tokens=new_tokens, chunk_size=chunk_size, eos_token_id=eos_ids,
                   on_phase=on_phase)
    tokens = gen.sequences[0].tolist()
    eos = set(eos_ids)
    if eos and any(t in eos for t in tokens):
        tokens = tokens[:next(i for i, t in enumerate(tokens) if t in eos)]
    if tokenizer is not None:
        text_out = tokenizer.decode(tokens, skip_special_tokens=True)
    else:  # random weights: the ids are all there is to show
        text_out = " ".join(map(str, tokens))
    return RunResult(text=text_out, generation=gen, stats=cache.stats(), budget_note=note, recall=recall,
                     recalled_tokens=max(cache.recalled_tokens, default=0))


def _eos(tokenizer, model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]
