"""Read vLLM's and SGLang's start-up logs back: the lines that state KV capacity, the memory each step took, and the
flags the engine ran with, as a `LogFacts`. The formats are those of the engines' own log calls:

vLLM (V1; 0.15.1 and 0.33.0 format strings in vllm/v1/worker/gpu_worker.py, gpu_model_runner.py,
vllm/v1/core/kv_cache_utils.py, vllm/utils/mem_utils.py):
    Initializing a V1 LLM engine (v0.15.1) with config: model='...', ..., max_seq_len=131072, ...,
        tensor_parallel_size=1, ..., enforce_eager=True, kv_cache_dtype=auto, ...
    non-default args: {..., 'gpu_memory_utilization': 0.9, ...}
    Model loading took 14.99 GiB memory and 6.720924 seconds
    Memory profiling takes 17.96 seconds. Total non KV cache memory: 17.12GiB; torch peak memory increase: 1.89GiB;
        non-torch forward increase memory: 0.25GiB; weights memory: 14.99GiB.
    Available KV cache memory: 19.28 GiB
    GPU KV cache size: 157,936 tokens
    Maximum concurrency for 131,072 tokens per request: 1.20x
SGLang (0.4.x and 0.5.23: model_runner.py, memory_pool.py, kv_cache_configurator.py, scheduler.py):
    server_args=ServerArgs(model_path='...', ..., mem_fraction_static=0.88, ..., tp_size=1, ...)
    Load weight begin. avail mem=78.81 GB
    Load weight end. type=LlamaForCausalLM, dtype=torch.bfloat16, avail mem=63.72 GB[, mem usage=15.09 GB].
    KV Cache is allocated. [dtype: torch.bfloat16, ][#tokens: 444500, ]K size: 27.13 GB, V size: 27.13 GB
    max_total_num_tokens=444500, [chunked_prefill_size=8192, ]max_prefill_tokens=16384, max_running_requests=2049,
        context_len=131072
SGLang's "GB" are GiB (it divides by 1 << 30).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvscope.errors import usage

GIB = 1024**3
NUM = r"([0-9][0-9,]*(?:\.[0-9]+)?)"

VLLM_PATTERNS = {
    "version": r"LLM engine \(v([0-9][^)\s]*)\)",
    "model": r"with config: model='([^']+)'",
    "max_model_len": r"max_seq_len=(\d+)",
    "tp": r"tensor_parallel_size=(\d+)",
    "kv_cache_dtype": r"\bkv_cache_dtype=([A-Za-z0-9_]+)",
    "enforce_eager": r"enforce_eager=(True|False)",
    "gpu_memory_utilization": r"'gpu_memory_utilization': ([0-9.]+)",
    "weights_gib": r"(?:Model loading took|Loading model weights took) " + NUM + r" (?:GiB|GB)",
    "non_kv_gib": r"Total non KV cache memory: " + NUM + r" ?GiB",
    "activation_gib": r"torch peak memory increase: " + NUM + r" ?GiB",
    "non_torch_gib": r"non-torch forward increase memory: " + NUM + r" ?GiB",
    "available_kv_gib": r"Available KV cache memory: " + NUM + r" GiB",
    "kv_tokens": r"KV cache size: " + NUM + r" tokens",
    "max_concurrency": r"Maximum concurrency for [0-9,]+ tokens per request: " + NUM + r"x",
    "cuda_graph_gib": r"(?:Graph capturing finished in [0-9.]+ secs?, took|Estimated CUDA graph memory:) " + NUM
                      + r" GiB",
    "api_server": r"(api_server\.py|vllm serve|Starting vLLM API server)",
    "llm_class": r"(\[llm\.py:\d+\])",
    "error": r"((?:No available memory for the cache blocks|To serve at least one request with the model'?s max seq "
             r"len)[^\n]*)",
}
SGLANG_PATTERNS = {
    "model": r"model_path='([^']+)'",
    "mem_fraction_static": r"mem_fraction_static=([0-9.]+)",
    "tp": r"\btp_size=(\d+)",
    "kv_cache_dtype": r"\bkv_cache_dtype='([A-Za-z0-9_]+)'",
    "pre_load_free_gib": r"Load weight begin\. avail mem=" + NUM + r" GB",
    "after_weights_gib": r"Load weight end\.[^\n]*?avail mem=" + NUM + r" GB",
    "weights_gib": r"Load weight end\.[^\n]*?mem usage=" + NUM + r" GB",
    "kv_tokens": r"KV Cache is allocated\.[^\n]*?#tokens: " + NUM,
    "k_gib": r"KV Cache is allocated\.[^\n]*?K size: " + NUM + r" GB",
    "v_gib": r"KV Cache is allocated\.[^\n]*?V size: " + NUM + r" GB",
    "kv_gib": r"KV Cache is allocated\.[^\n]*?KV size: " + NUM + r" GB",
    "max_total_num_tokens": r"max_total_num_tokens=" + NUM,
    "chunked_prefill_size": r"\bchunked_prefill_size=(-?\d+)",
    "max_running_requests": r"\bmax_running_requests=(\d+)",
    "context_len": r"\bcontext_len=(\d+)",
    "error": r"((?:Not enough memory\. Please try to increase --mem-fraction-static|Loaded weights leave no GPU "
             r"memory for the KV cache)[^\n]*)",
}
CAPACITY = {"vllm": ("available_kv_gib", "kv_tokens"), "sglang": ("max_total_num_tokens", "kv_tokens", "k_gib")}
STRINGS = {"version", "model", "kv_cache_dtype", "enforce_eager", "error", "api_server", "llm_class"}


@dataclass
class LogFacts:
    engine: str
    path: str
    values: dict = field(default_factory=dict)

    def get(self, key: str, default=None):
        return self.values.get(key, default)

    def to_dict(self) -> dict:
        return asdict(self)


def _first(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text)
    return m.group(1) if m else None


def _value(key: str, raw: str):
    if key in STRINGS:
        return raw == "True" if key == "enforce_eager" else raw
    number = float(raw.replace(",", ""))
    return int(number) if number.is_integer() and not key.endswith(("_gib", "concurrency", "utilization", "static")) \
        else number


def detect(text: str) -> str | None:
    """vllm or sglang from their own capacity lines first (an SGLang log can mention vllm in an import warning)."""
    if re.search(r"Available KV cache memory|GPU KV cache size|LLM engine \(v|Maximum concurrency for", text):
        return "vllm"
    if re.search(r"max_total_num_tokens=|KV Cache is allocated|ServerArgs\(|Load weight (begin|end)", text):
        return "sglang"
    return None


def read(path: str | Path) -> str:
    p = Path(path).expanduser()
    try:
        return p.read_text(errors="replace")
    except FileNotFoundError:
        raise usage(f"no such log file: {p}", expected="a vLLM or SGLang start-up log", fix="--from-log") from None
    except (IsADirectoryError, PermissionError, OSError) as exc:
        raise usage(f"cannot read {p}: {exc.strerror or exc}", expected="a readable log file",
                    fix="--from-log") from None


def parse_log(path: str | Path, engine: str | None = None) -> LogFacts:
    """The capacity facts of a start-up log; a log with no capacity line is a `UsageError`."""
    text = read(path)
    found = detect(text)
    if engine and found and found != engine:
        raise usage(f"{path} is a {found} log, but --engine {engine} was given", expected=f"a {engine} start-up log",
                    fix="--engine or --from-log")
    engine = engine or found
    if engine is None:
        raise usage(f"{path} is neither a vLLM nor an SGLang start-up log",
                    expected="vLLM's 'GPU KV cache size: N tokens' or SGLang's 'max_total_num_tokens=N'",
                    fix="--from-log")
    patterns = VLLM_PATTERNS if engine == "vllm" else SGLANG_PATTERNS
    values = {k: _value(k, raw) for k, pattern in patterns.items() if (raw := _first(pattern, text)) is not None}
    if not any(k in values for k in CAPACITY[engine]) and "error" not in values:
        lines = ("'Available KV cache memory: X GiB' or 'GPU KV cache size: N tokens'" if engine == "vllm"
                 else "'max_total_num_tokens=N' or 'KV Cache is allocated. #tokens: N'")
        raise usage(f"{path} has no KV capacity line", expected=f"a {engine} start-up log that reached {lines}",
                    fix="--from-log (the whole log from start-up, not an excerpt)")
    return LogFacts(engine, str(path), values)
