"""A `Workload`: what will run (batch, prompt length, new tokens, dtypes, parallelism, runtime, the cache's settings
and the device memory it runs in)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kvscope.errors import require_positive, usage
from kvscope.kvformats import dense_dtype, kv_format
from kvscope.weightformats import weight_format

RUNTIMES = ("hf", "kvscope")
DEFAULT_CHUNK = 512  # prefill chunk of kvscope's runtime, tokens per sequence
# the most prompt tokens one prefill forward of kvscope's runtime holds (all sequences together): a large batch
# prefills in shorter chunks, so prefill activations stay bounded whatever the batch
PREFILL_TOKENS = 8192


def prefill_chunk(batch: int, chunk_size: int = DEFAULT_CHUNK, prefill_tokens: int = PREFILL_TOKENS) -> int:
    """Tokens per sequence of each prefill forward: `chunk_size`, shortened so batch x chunk <= prefill_tokens."""
    return max(1, min(chunk_size, prefill_tokens // batch))
# Workload field -> the CLI option that sets it (messages name the option; Python callers read the field's name)
_OPTIONS = {"batch": "--batch", "context": "--context", "new_tokens": "--new-tokens", "tp": "--tp",
            "chunk_size": "--chunk-size", "budget_tokens": "--budget"}


@dataclass(frozen=True)
class Workload:
    """One generation job; `context` is the prompt length in tokens.

    `weights` (int8, int4, fp8; None: the model dtype) is the format of the decoder layers' projections
    (kvscope.weightformats): it frees weight memory, which can hold more KV; the KV cache's own format is `kv_dtype`.
    `budget_tokens` (kvscope runtime) caps the KV cache per sequence and layer; the cache is allocated once at its
    budget plus, for an evicting `policy`, room for one prefill chunk. `policy` None means: `full` without a budget,
    an evicting policy with one; `knobs` are its settings (`kvscope.policies.knobs`). `gpu_memory` (bytes) is the
    device memory it runs in: the capacity the planner checks against, emulated by the doctor on a larger GPU; None
    means the device's own (or the planner's default GPU).
    """

    batch: int = 1
    context: int = 2048
    new_tokens: int = 128
    dtype: str = "bf16"
    kv_dtype: str | None = None
    weights: str | None = None
    tp: int = 1
    runtime: str = "hf"
    budget_tokens: int | None = None
    chunk_size: int = DEFAULT_CHUNK
    policy: str | None = None
    knobs: dict[str, Any] = field(default_factory=dict)
    gpu_memory: int | None = None
    recall: str | None = None  # "cpu": prefill evictions wait in host memory for the question (kvscope.cache.recall)

    def __post_init__(self) -> None:
        require_positive("batch", self.batch, option="--batch")
        require_positive("context", self.context, option="--context")
        require_positive("new tokens", self.new_tokens, option="--new-tokens")
        require_positive("tensor-parallel degree", self.tp, option="--tp")
        require_positive("prefill chunk size", self.chunk_size, option="--chunk-size")
        if self.budget_tokens is not None:
            require_positive("KV budget", self.budget_tokens, option="--budget")
        if self.gpu_memory is not None:
            require_positive("GPU memory", self.gpu_memory, option="--gpu-memory")
        for name, option in _OPTIONS.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise usage(f"{name} must be a whole number, got {value!r}", fix=option)
        object.__setattr__(self, "dtype", dense_dtype(self.dtype))
        if self.weights is not None:
            fmt = weight_format(self.weights)
            object.__setattr__(self, "weights", fmt.name)
            if self.tp != 1:
                raise usage(f"--weights {fmt.name} with --tp {self.tp}: kvscope quantizes the weights of one GPU's "
                            "model only", expected="--tp 1 with --weights", fix="drop --weights or --tp")
        kv = kv_format(self.kv_dtype or self.dtype).name
        object.__setattr__(self, "kv_dtype", kv)
        if self.runtime not in RUNTIMES:
            raise usage(f"unknown runtime {self.runtime!r}", expected=" or ".join(RUNTIMES), fix="--runtime")
        if self.recall is not None and self.recall != "cpu":
            raise usage(f"unknown recall tier {self.recall!r}", expected="cpu, or none", fix="--recall")
        if self.recall is not None and self.runtime == "hf":
            raise usage("a recall tier needs kvscope's cache and its chunked prefill",
                        expected="--runtime kvscope with --recall cpu", fix="--runtime kvscope")
        if self.runtime == "hf" and kv != self.dtype:
            raise usage(
                f"plain transformers generate() keeps its KV cache in the model dtype ({self.dtype}), not {kv}",
                expected=f"--kv-dtype {self.dtype} with --runtime hf",
                fix="--runtime kvscope to plan quantized KV storage",
            )
        if self.runtime == "hf" and self.budget_tokens is not None:
            raise usage("a KV budget needs kvscope's cache", expected="--runtime kvscope with --budget",
                        fix="--runtime kvscope")

    @property
    def evicts(self) -> bool:
        """Whether kvscope's cache may evict (and so keeps room for a chunk above its budget)."""
        return self.policy != "full" if self.policy is not None else self.budget_tokens is not None

    @property
    def total_tokens(self) -> int:
        """Tokens per sequence at the end of generation (prompt + new), as the user counts them."""
        return self.context + self.new_tokens

    @property
    def kv_tokens(self) -> int:
        """Tokens the KV cache holds per sequence at its fullest, and positions the model sees: prompt + new - 1.

        The one count kvscope uses everywhere (the doctor, the planner, the budget fixes, the position limit): the last
        new token is sampled from the logits and never fed back, so it never enters the cache."""
        return self.context + self.new_tokens - 1

    @property
    def cache_policy(self) -> str:
        """The policy kvscope's cache runs: `policy`, or `full` when none was named."""
        return self.policy or "full"

    def with_(self, **changes: Any) -> Workload:
        return replace(self, **changes)

    def changes_to(self, other: Workload) -> dict[str, Any]:
        """The fields `other` sets differently, as a fix names them. The knobs go with the policy and the device
        memory with the GPU a fix names, so neither is listed."""
        mine = self.to_dict()
        return {k: v for k, v in other.to_dict().items() if v != mine[k] and k not in ("knobs", "gpu_memory")}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
