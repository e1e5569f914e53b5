"""Bytes a generation holds on one GPU, phase by phase; pure arithmetic on a `ModelSpec` and a `Workload`.

The model counts the tensors that are alive at the moment each phase peaks, following the code path of
`transformers` 5.x `LlamaForCausalLM` with sdpa attention (no padding: flash attention with `is_causal`, GQA without
repeating KV heads) and the default `DynamicCache`:

prefill, at the MLP of the last layer (the largest moment of the forward pass):
    weights + KV of all layers for the prompt
    + per prompt token: 4 hidden-sized tensors (input embeddings, the layer input, the residual after attention,
      the normed MLP input) + 3 intermediate-sized tensors (act(gate), up, act(gate) * up)
      + the RoPE cos/sin tables (2 head_dim values)
decode, at the last layer's `torch.cat` of the last step (DynamicCache grows by concatenation, so the old and the new
value tensor of one layer exist together):
    weights + KV of every layer at its final length + one layer's value tensor at the previous length
    + one token's activations per sequence + the logits `generate` keeps (bf16 from the head, an fp32 copy).

kvscope's runtime allocates its cache once (budget + one chunk, or the whole sequence) and prefills in chunks, so
its activations are those of one chunk, plus the boolean mask its cache builds for each layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from kvscope.kvformats import (
    DTYPE_BYTES,
    attention_block_rows,
    cache_layout,
    flush_temporary_bytes,
    layout_bytes,
    recall_tier_bytes,
    store_layout,
)
from kvscope.models.spec import ModelSpec
from kvscope.planner.workload import Workload, prefill_chunk
from kvscope.weightformats import weight_format

# Measured on the H100 80GB, torch 2.11 + CUDA 13 (benchmarks/planner_accuracy.py, docs/benchmarks.md):
# - memory outside PyTorch's counters once the CUDA context and the cuBLAS/cuDNN modules are loaded;
CUDA_CONTEXT_BYTES = 718_077_952
# - the cuBLAS workspace, allocated through PyTorch's allocator at the first matrix product and kept;
WORKSPACE_BYTES = 33_554_432
# - reserved-but-unallocated memory at the prefill peak of plain generate(): the caching allocator cannot reuse the
#   blocks the MLP temporaries leave between the growing KV tensors, and holds about two intermediate-sized tensors
#   per prompt token beyond what is allocated (55.6-57.3 KB per token for the 8B shape at 13k-213k prompt tokens);
PREFILL_SLACK_INTERMEDIATES = 2
# - during decode, DynamicCache grows every layer by torch.cat, leaving freed blocks one token too small for the next
#   step; the slack measured was 0.9-1.6x the final KV cache (two decode-heavy points), so the planner assumes 1x.
DECODE_SLACK_KV_FRACTION = 1.0


@dataclass(frozen=True)
class Phase:
    """Memory at the moment one phase peaks, in bytes."""

    name: str
    weights: int
    kv: int
    activations: int
    logits: int
    slack: int = 0  # reserved by the allocator but not allocated, at this moment
    workspace: int = WORKSPACE_BYTES

    @property
    def total(self) -> int:
        """Allocated bytes: what `torch.cuda.max_memory_allocated()` reports at this moment."""
        return self.weights + self.kv + self.activations + self.logits + self.workspace

    @property
    def reserved(self) -> int:
        return self.total + self.slack

    def to_dict(self) -> dict[str, int | str]:
        return {**asdict(self), "total": self.total, "reserved": self.reserved}


def prefill_bytes_per_token(spec: ModelSpec, dtype: str, tp: int = 1) -> int:
    """Activation bytes per prompt token alive at the MLP of the last layer."""
    s = DTYPE_BYTES[dtype]
    return 4 * spec.hidden_size * s + 3 * (spec.intermediate_size // tp) * s + 2 * spec.head_dim * s


def decode_bytes_per_sequence(spec: ModelSpec, dtype: str, tp: int = 1) -> int:
    """Activation bytes of one decoded token."""
    return prefill_bytes_per_token(spec, dtype, tp)


def logits_bytes(spec: ModelSpec, batch: int, dtype: str) -> int:
    """Logits of the last position: the head's output in the model dtype and generate()'s fp32 copy."""
    return batch * spec.vocab_size * (DTYPE_BYTES[dtype] + 4)


def kv_cache_tokens(w: Workload) -> int:
    """Tokens per sequence the cache holds at its largest (kvscope allocates this once; HF grows to it).

    kvscope's cache is sized to its budget (the whole sequence without one) plus, for an evicting policy, room for one
    prefill chunk."""
    if w.runtime == "hf":
        return w.kv_tokens  # the last generated token is never fed back
    return (w.budget_tokens or w.kv_tokens) + kvscope_room(w)


def kvscope_chunk(w: Workload) -> int:
    """Prompt tokens per sequence in each prefill forward of kvscope's runtime (kvscope.runtime.generate)."""
    return min(prefill_chunk(w.batch, w.chunk_size), w.context)


def kvscope_room(w: Workload) -> int:
    return kvscope_chunk(w) if w.evicts else 0


def kvscope_cache_bytes(spec: ModelSpec, w: Workload) -> int:
    """The one allocation of kvscope's cache, to the byte: every layer's store, slot state and free-slot queue
    (kvscope.kvformats.cache_layout, the list the cache allocates from)."""
    layout = cache_layout(spec.num_layers, w.batch, spec.kv_heads_per_gpu(w.tp), spec.head_dim, w.kv_dtype, w.dtype,
                          w.budget_tokens or w.kv_tokens, kvscope_room(w))
    return layout_bytes(layout)


def kv_store_bytes(spec: ModelSpec, w: Workload) -> int:
    """Bytes the keys and values take at the cache's largest, whole batch and all layers: for kvscope's runtime what
    `BudgetedCache.stats().bytes` reports (its stores: budget + room slots, int4's full-precision window)."""
    if w.runtime == "kvscope":
        layer = store_layout(w.kv_dtype, w.batch, spec.kv_heads_per_gpu(w.tp), kv_cache_tokens(w), spec.head_dim,
                             w.dtype)
        return spec.num_layers * layout_bytes(layer, align=False)
    per_token = spec.kv_bytes_per_token(w.kv_dtype, w.tp)
    return w.batch * (kv_cache_tokens(w) * per_token + spec.kv_fixed_bytes(w.kv_dtype, w.dtype, w.tp))


def recall_host_bytes(spec: ModelSpec, w: Workload) -> int:
    """Host memory the recall tier can take (kvscope.cache.recall): every prompt token evicted once, in the tier's
    format (the store's, int8 for int4), with its position, score and validity. 0 without recall."""
    if w.recall is None:
        return 0
    return recall_tier_bytes(spec.num_layers, w.batch, spec.kv_heads_per_gpu(w.tp), w.context, spec.head_dim,
                             w.kv_dtype, w.dtype)


def kv_bytes(spec: ModelSpec, w: Workload) -> int:
    """The KV cache's memory at its largest: for kvscope's runtime its whole allocation (stores, slot state, queues)."""
    return kvscope_cache_bytes(spec, w) if w.runtime == "kvscope" else kv_store_bytes(spec, w)


def hf_phases(spec: ModelSpec, w: Workload, weights: int) -> list[Phase]:
    """Peaks of plain `transformers` `generate()` with its default cache and sdpa attention."""
    per_token_kv = spec.kv_bytes_per_token(w.kv_dtype, w.tp)
    prompt = w.batch * w.context
    s = DTYPE_BYTES[w.dtype]
    prefill_slack = PREFILL_SLACK_INTERMEDIATES * prompt * (spec.intermediate_size // w.tp) * s
    phases = [Phase("prefill", weights, prompt * per_token_kv, prompt * prefill_bytes_per_token(spec, w.dtype, w.tp),
                    0, prefill_slack)]
    if w.new_tokens >= 2:
        final = w.kv_tokens
        one_tensor = w.batch * (final - 1) * spec.kv_heads_per_gpu(w.tp) * spec.head_dim * DTYPE_BYTES[w.kv_dtype]
        kv = w.batch * final * per_token_kv
        activations = w.batch * decode_bytes_per_sequence(spec, w.dtype, w.tp)
        phases.append(Phase("decode", weights, kv + one_tensor, activations, logits_bytes(spec, w.batch, w.dtype),
                            int(DECODE_SLACK_KV_FRACTION * kv)))
    return phases


def attention_temporaries(spec: ModelSpec, w: Workload, queries: int, slots: int) -> int:
    """Bytes kvscope's attention holds at once for `queries` new tokens against `slots` cached ones, in one layer:
    the validity snapshot [B, Hkv, S]; for one block of query rows (`attention_block_rows`), the boolean mask
    [B, Hkv, rows, S], its copy per query head [B, Hq, rows, S] and the additive mask sdpa makes from it in the model
    dtype (last dim padded to 16); an int4 store's flush (kvscope.kvformats.flush_temporary_bytes). (A quantized
    store's dequantized keys and values are in the cache's allocation: kvscope.kvformats.READ_BUFFER.)"""
    s = DTYPE_BYTES[w.dtype]
    heads = max(1, spec.num_heads // w.tp)
    kv_heads = spec.kv_heads_per_gpu(w.tp)
    padded = -(-slots // 16) * 16
    rows = min(queries, attention_block_rows(w.batch, heads, kv_heads, slots, s))
    masks = w.batch * kv_heads * slots + w.batch * rows * (kv_heads * slots + heads * slots + heads * padded * s)
    return masks + flush_temporary_bytes(w.kv_dtype, w.batch, kv_heads, slots, spec.head_dim)


def decode_step_temporaries(spec: ModelSpec, w: Workload, slots: int) -> int:
    """What kvscope's decode step holds besides the cache (kvscope.runtime.step, captured in a CUDA graph): one
    layer's activations for B tokens, the fused attention's partial results (fp32, one row per query head and split of
    64 slots), the logits [B, V] in the model dtype, and the free-slot refill's sort of one layer's slots (int64)."""
    heads = max(1, spec.num_heads // w.tp)
    splits = -(-slots // 64)
    attention = w.batch * heads * splits * (spec.head_dim + 2) * 4
    refill = 2 * w.batch * spec.kv_heads_per_gpu(w.tp) * slots * 8
    return w.batch * decode_bytes_per_sequence(spec, w.dtype, w.tp) + attention + refill


def kvscope_phases(spec: ModelSpec, w: Workload, weights: int) -> list[Phase]:
    """Peaks of kvscope's runtime: one preallocated cache, chunked prefill with logits of the last position only (a
    large batch in shorter chunks: kvscope.planner.workload.prefill_chunk), a decode step captured in a CUDA graph."""
    cache = kv_bytes(spec, w)
    slots = kv_cache_tokens(w)
    chunk = kvscope_chunk(w)
    s = DTYPE_BYTES[w.dtype]
    prefill = w.batch * chunk * prefill_bytes_per_token(spec, w.dtype, w.tp) + attention_temporaries(spec, w, chunk,
                                                                                                      slots)
    decode = decode_step_temporaries(spec, w, slots) + attention_temporaries(spec, w, 1, slots)
    logits = w.batch * spec.vocab_size * s  # the head's output for the last position; argmax needs no fp32 copy
    # the allocator keeps about one forward's activations reserved beyond what is allocated (blocks of the previous
    # chunk not yet reusable): H200, llama-3.1-8b shape, 4096 + 16 tokens, batch 237 ran and 238 did not
    # (docs/benchmarks.md, runtime-capacity), which this slack separates
    slack = w.batch * chunk * prefill_bytes_per_token(spec, w.dtype, w.tp)
    return [Phase("prefill", weights, cache, prefill, logits, slack), Phase("decode", weights, cache, decode, logits)]


def weights_bytes(spec: ModelSpec, w: Workload) -> int:
    """The model's weights on one GPU, in the workload's weight format (kvscope.weightformats) or its dtype."""
    return spec.weights_bytes(w.dtype, w.tp, weights=w.weights)


def product_temporary_bytes(spec: ModelSpec, w: Workload, tokens: int) -> int:
    """What the largest quantized matrix product of `tokens` rows holds besides its input and output (the weight
    dequantized, a padded or scaled copy: kvscope.weightformats); 0 for dense weights. It exists while that product
    runs, on top of the activations."""
    if w.weights is None:
        return 0
    fmt = weight_format(w.weights)
    return max(fmt.product_temporary_bytes(n, k, w.dtype, tokens) for _, n, k in spec.linears())


def phase_tokens(w: Workload, phase: str) -> int:
    """Rows of each matrix product in a phase: the prompt (plain generate) or one chunk (kvscope), then one token."""
    if phase == "decode":
        return w.batch
    return w.batch * (w.context if w.runtime == "hf" else kvscope_chunk(w))


def phases(spec: ModelSpec, w: Workload) -> list[Phase]:
    weights = weights_bytes(spec, w)
    out = hf_phases(spec, w, weights) if w.runtime == "hf" else kvscope_phases(spec, w, weights)
    if w.weights is None:
        return out
    sets = weight_format(w.weights).prefill_slack_sets  # what a prefill's freed temporaries leave reserved
    return [_with_products(p, product_temporary_bytes(spec, w, phase_tokens(w, p.name)), sets) for p in out]


def _with_products(p: Phase, temporary: int, sets: int) -> Phase:
    """A phase with its products' temporaries allocated, and in a prefill `sets` more of them reserved."""
    return replace(p, activations=p.activations + temporary, slack=p.slack + (sets * temporary if p.name == "prefill"
                                                                               else 0))


def overhead_bytes(phases: list[Phase]) -> int:
    """What PyTorch's allocated counters do not show at the peak: the CUDA context and the allocator's slack.

    The slack is that of the phase that reserves the most, which need not be the phase that allocates the most.
    """
    peak = max(phases, key=lambda p: p.total)
    return CUDA_CONTEXT_BYTES + max(p.reserved for p in phases) - peak.total
