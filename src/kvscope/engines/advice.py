"""What `kvscope advise` asks and answers, for either engine: the `Request`, the `Advice` (memory rows, the capacity
check in the form needed / available / estimate / flag, fixes, the engine's command line) and the shared helpers
(model references, versions, KV dtype names). `kvscope.engines.advise.advise(request)` answers one.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from kvscope.errors import usage
from kvscope.models.spec import ModelSpec

ENGINES = ("vllm", "sglang")


@dataclass(frozen=True)
class Request:
    """The deployment asked about; None means "the engine's default" (or "as large as fits" for concurrency)."""

    engine: str
    model: str
    gpu: str | None = None
    gpu_memory: str | int | None = None
    max_model_len: int | None = None
    concurrency: int | None = None
    kv_dtype: str | None = None  # kvscope's names: bf16, fp16, fp8 (int8/int4 exist in kvscope, not in the engines)
    tp: int = 1
    dtype: str = "bf16"
    engine_version: str | None = None
    memory_fraction: float | None = None  # vLLM --gpu-memory-utilization, SGLang --mem-fraction-static
    batched_tokens: int | None = None  # vLLM --max-num-batched-tokens, SGLang --chunked-prefill-size
    no_cuda_graphs: bool = False  # vLLM --enforce-eager, SGLang --disable-cuda-graph
    offline: bool = False  # vLLM's LLM class instead of `vllm serve` (other batch defaults)


@dataclass(frozen=True)
class Row:
    """One line of the memory accounting."""

    item: str
    bytes: int | None
    how: str


@dataclass(frozen=True)
class Fix:
    action: str
    flags: str  # the engine flags that apply it
    needed_tokens: int
    available_tokens: int  # before the fix
    estimate_tokens: int  # after the fix
    fits: bool


@dataclass
class Advice:
    engine: str
    version: str
    model: str
    device: dict
    rows: list[Row]
    kv_tokens: int
    max_model_len: int
    max_concurrency: float
    concurrency: int | None
    needed_tokens: int | None
    fits: bool | None
    refusal: str | None  # the engine's own start-up error, when it would not start
    flags: dict[str, str]
    command: str
    alternative: str | None = None
    fixes: list[Fix] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    prediction: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_version(text: str | None, default: tuple[int, ...], engine: str, oldest: tuple[int, ...]) -> tuple[int, ...]:
    if text is None:
        return default
    match = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?\S*", text.strip())
    if not match:
        raise usage(f"malformed engine version {text!r}", expected="a release such as 0.33.0",
                    fix="--engine-version")
    version = tuple(int(g) for g in match.groups() if g is not None)
    if version < oldest:
        raise usage(f"{engine} {text} is older than kvscope models", expected=f"{'.'.join(map(str, oldest))} or later",
                    fix="--engine-version")
    return version


def version_text(v: tuple[int, ...]) -> str:
    return ".".join(str(x) for x in v)


def _normal(name: str) -> str:
    name = name.strip().lower().rsplit("/", 1)[-1]
    name = name.removeprefix("meta-")
    return re.sub(r"-(instruct|chat|hf)$", "", name)


def resolve_model(ref: str) -> tuple[ModelSpec, str]:
    """(spec, the engine's model argument) for a catalogue name, a Hugging Face id of a catalogue model, or a path."""
    from kvscope.models.catalogue import CATALOGUE, is_catalogue_name
    from kvscope.models.loader import spec_for

    def repo(entry) -> str:
        return entry.source.split("huggingface.co/", 1)[1].split("/blob/", 1)[0]

    if is_catalogue_name(ref):
        entry = CATALOGUE[ref.strip().lower()]
        return ModelSpec.from_catalogue(entry.name), repo(entry)
    from pathlib import Path

    if "/" in ref and not Path(ref).expanduser().exists():
        for entry in CATALOGUE.values():
            if _normal(repo(entry)) == _normal(ref):
                return ModelSpec.from_catalogue(entry.name), ref
    return spec_for(ref), ref


def launch_line(head: str, flags: dict[str, str], dtype: str, switch: str | None) -> tuple[str, dict[str, str]]:
    """An engine's launch command: `head`, the flags (with --dtype when the weights are not bf16) and a switch."""
    if dtype != "bf16":
        flags = flags | {"--dtype": {"fp16": "float16", "fp32": "float32"}[dtype]}
    line = f"{head} " + " ".join(f"{k} {v}" for k, v in flags.items())
    return line + (f" {switch}" if switch else ""), flags


def check_positive(name: str, value: int | float | None, flag: str) -> None:
    from kvscope.errors import require_positive

    if value is not None:
        require_positive(name, value, option=flag)


def tp_options(spec: ModelSpec, tp: int) -> list[int]:
    """Larger tensor-parallel degrees that divide the attention heads, for fixes."""
    return [t for t in (2, 4, 8) if t > tp and spec.num_heads % t == 0]
