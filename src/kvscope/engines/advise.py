"""`advise(request)`: an engine's flags for a deployment, from that engine's own memory accounting (vLLM's or
SGLang's module); the vocabulary they share is kvscope.engines.advice.

>>> from kvscope.engines.advice import Request
>>> a = advise(Request(engine="vllm", model="llama-3.1-8b", gpu="H100-80GB", max_model_len=32768, concurrency=8))
>>> a.command.startswith("vllm serve meta-llama/Llama-3.1-8B")
True
"""

from __future__ import annotations

from kvscope.engines.advice import ENGINES, Advice, Request, check_positive
from kvscope.errors import usage


def advise(req: Request) -> Advice:
    """The engine's flags for this deployment, with the numbers behind them."""
    if req.engine not in ENGINES:
        raise usage(f"unknown engine {req.engine!r}", expected=" or ".join(ENGINES), fix="--engine")
    check_positive("max model length", req.max_model_len, "--max-model-len")
    check_positive("concurrency", req.concurrency, "--concurrency")
    check_positive("tensor-parallel degree", req.tp, "--tp")
    check_positive("batched tokens", req.batched_tokens, "--max-num-batched-tokens / --chunked-prefill-size")
    if req.engine == "vllm":
        from kvscope.engines.advise_vllm import advise_vllm

        return advise_vllm(req)
    from kvscope.engines.advise_sglang import advise_sglang

    return advise_sglang(req)
