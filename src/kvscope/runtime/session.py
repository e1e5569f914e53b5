"""One prompt through a budgeted cache, with everything a user wants to see afterwards (the library call behind
`kvscope run`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kvscope.cache import BudgetedCache, CacheStats
from kvscope.errors import usage
from kvscope.runtime.generate import Generation, PhaseCallback, generate


@dataclass
class RunResult:
    text: str
    generation: Generation
    stats: CacheStats
    budget_note: str | None

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
                    fix="MODEL (random-weight shapes take --context N instead)")
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_dict=True, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise usage("the prompt encodes to no tokens", fix="--prompt")
    return ids


def run_prompt(model, tokenizer, text: str, *, chat: bool = True, policy: str = "lru", budget_tokens: int | None = None,
               kv_dtype: str | None = None, max_new_tokens: int = 64, chunk_size: int = 512,
               on_phase: PhaseCallback | None = None) -> RunResult:
    """Generate greedily for one prompt under a `BudgetedCache`. Without a budget the cache is sized to hold the
    whole sequence, so nothing is evicted (and `full` works)."""
    ids = encode(tokenizer, text, chat)
    note = None
    if budget_tokens is None:
        budget_tokens = ids.shape[1] + max_new_tokens
        note = f"no --budget: sized to the whole sequence ({budget_tokens} tokens), nothing evicted"
    cache = BudgetedCache(model, policy, budget_tokens=budget_tokens, kv_dtype=kv_dtype, chunk_size=chunk_size)
    eos_ids = _eos(tokenizer, model)
    gen = generate(model, ids, cache, max_new_tokens=max_new_tokens, chunk_size=chunk_size, eos_token_id=eos_ids,
                   on_phase=on_phase)
    tokens = gen.sequences[0].tolist()
    eos = set(eos_ids)
    if eos and any(t in eos for t in tokens):
        tokens = tokens[:next(i for i, t in enumerate(tokens) if t in eos)]
    text_out = tokenizer.decode(tokens, skip_special_tokens=True)
    return RunResult(text=text_out, generation=gen, stats=cache.stats(), budget_note=note)


def _eos(tokenizer, model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]
