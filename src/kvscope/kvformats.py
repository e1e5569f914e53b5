"""Storage formats of the KV cache, and their exact bytes per token.

This module is the single source of truth for what one cached token costs: the planner prices a workload with it and
the cache allocates its storage from it, so the two agree to the byte (tests check it). Pure Python, no torch.

Formats (per layer, per KV head, per token, head_dim = d):
- dense `fp32` / `bf16` / `fp16`: keys and values at d elements each.
- `fp8` (e4m3): d bytes each for keys and values, plus one fp16 scale per (token, head) for each.
- `int8` (per token, asymmetric): d bytes each, plus an fp16 scale and an fp16 zero point per (token, head) for each.
- `int4` (as in KIVI): keys quantized per channel over groups of `INT4_GROUP` tokens, values per token over groups
  of `INT4_GROUP` channels, two values per byte, with an fp16 scale and zero point per group; the most recent tokens
  stay in a full-precision window of `INT4_RESIDUAL` tokens, a fixed cost that is not per token (flushed half at a
  time, so it holds between `INT4_RESIDUAL` / 2 and `INT4_RESIDUAL` of the newest tokens). Needs a head_dim
  that is a multiple of `INT4_GROUP`. Per-channel key scales cost 4 * d bytes per group of `INT4_GROUP` slots, i.e.
  d / 16 bytes per slot; a store whose slot count is not a multiple of `INT4_GROUP` quantizes the keys of its last
  (slots % INT4_GROUP) slots per token like values instead (the same d / 16 bytes per slot), so the price per token
  below is exact for any slot count (kvscope.cache.quant_int4.Int4Store).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "torch.float32": "fp32",
    "torch.bfloat16": "bf16",
    "torch.float16": "fp16",
}
SCALE_BYTES = 2  # scales and zero points are fp16
INT4_GROUP = 64
INT4_RESIDUAL = 128


@dataclass(frozen=True)
class KVFormat:
    """How one KV format is laid out; `bytes_per_head_token` covers keys and values together."""

    name: str
    quantized: bool
    doc: str

    def bytes_per_head_token(self, head_dim: int, dense_bytes: int) -> int:
        """Exact bytes of keys+values for one token of one KV head (scales included, residual window excluded)."""
        d = head_dim
        if self.name in DTYPE_BYTES:
            return 2 * d * DTYPE_BYTES[self.name]
        if self.name == "fp8":
            return 2 * (d + SCALE_BYTES)
        if self.name == "int8":
            return 2 * (d + 2 * SCALE_BYTES)
        if self.name == "int4":
            # keys: d/2 packed bytes + (scale, zero) per channel shared by INT4_GROUP tokens
            # values: d/2 packed bytes + (scale, zero) per group of INT4_GROUP channels
            keys = d // 2 + (2 * SCALE_BYTES * d) // INT4_GROUP
            values = d // 2 + 2 * SCALE_BYTES * (d // INT4_GROUP)
            return keys + values
        raise AssertionError(self.name)

    def residual_tokens(self) -> int:
        """Tokens each layer keeps at full precision in addition to its quantized storage."""
        return INT4_RESIDUAL if self.name == "int4" else 0


KV_FORMATS = {
    "bf16": KVFormat("bf16", False, "bfloat16, 2 bytes per element"),
    "fp16": KVFormat("fp16", False, "float16, 2 bytes per element"),
    "fp32": KVFormat("fp32", False, "float32, 4 bytes per element"),
    "fp8": KVFormat("fp8", True, "float8 e4m3 with an fp16 scale per token and head"),
    "int8": KVFormat("int8", True, "int8 per token, asymmetric, fp16 scale and zero point"),
    "int4": KVFormat("int4", True, f"int4 KIVI-style, groups of {INT4_GROUP}, {INT4_RESIDUAL}-token fp window"),
}


def normalize_dtype(name: str) -> str:
    """Map 'bfloat16', 'torch.float16'... to the short names used everywhere ('bf16', 'fp16', 'fp32')."""
    key = str(name).strip().lower()
    return DTYPE_ALIASES.get(key, key)


def kv_format(name: str) -> KVFormat:
    """Look up a KV format by name; raise a `UsageError` that lists the known ones."""
    from kvscope.errors import usage

    key = normalize_dtype(name)
    if key not in KV_FORMATS:
        raise usage(f"unknown KV dtype {name!r}", expected="one of " + ", ".join(KV_FORMATS), fix="--kv-dtype")
    return KV_FORMATS[key]


def dense_dtype(name: str) -> str:
    """Validate a model (weights/activations) dtype name and return its short form."""
    from kvscope.errors import usage

    key = normalize_dtype(name)
    if key not in DTYPE_BYTES:
        raise usage(f"unknown dtype {name!r}", expected="one of " + ", ".join(DTYPE_BYTES), fix="--dtype")
    return key


# kvscope's attention builds its masks a block of query rows at a time, so that the boolean mask [B, Hkv, rows, S],
# its per-query-head copy [B, Hq, rows, S] and the additive mask sdpa makes from it [B, Hq, rows, S16] (model dtype)
# stay under this many bytes together, however large the batch and the cache; the planner uses the same rule.
ATTENTION_BLOCK_BYTES = 256 * 1024**2


def attention_block_rows(batch: int, heads: int, kv_heads: int, slots: int, elem_bytes: int) -> int:
    padded = -(-slots // 16) * 16
    per_row = batch * (kv_heads * slots + heads * slots + heads * padded * elem_bytes)
    return max(1, ATTENTION_BLOCK_BYTES // per_row)


# --- the exact layout of a BudgetedCache's one allocation (kvscope.cache.arena), in pure Python -----------------------
# The cache builds its tensors from these lists and the planner prices them, so the two agree to the byte.

ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "uint8": 1, "bool": 1, "int64": 8}
ALIGN = 256  # every tensor of the allocation starts at a multiple of this many bytes
QUEUE_MIN = 64  # free-slot queue entries of a cache with no room above its budget (refilled every QUEUE_MIN steps)

Layout = list[tuple[str, tuple[int, ...], str]]  # (name, shape, element type)
# A quantized store's read dequantizes every slot of its layer, all rows, into a [2, B, H, slots, D] dense tensor that
# lives until that layer's attention is done. One buffer in the cache's allocation serves every layer (layers run one
# at a time): as a fresh tensor each read, the allocator split the freed block between reads and then could not find
# it whole (H200, llama-3.1-8b shape, int8 KV at 424 x 4112 tokens: an OOM asking for 6.65 GiB with the planner's
# peak 2 GB under the GPU; docs/benchmarks.md, runtime-capacity).
READ_BUFFER = "read_buffer"
INT4_FLUSH_BLOCK_BYTES = 128 * 1024**2  # an int4 flush decodes at most about this many bytes of fp32 K/V at once


def flush_temporary_bytes(kv: str, batch: int, heads: int, slots: int, head_dim: int) -> int:
    """What an int4 store's flush (kvscope.cache.quant_int4.Int4Store._flush) holds at once, 0 for the other
    formats: its per-slot masks over the whole store (the fp32 marker, its ring age, four booleans: 13 bytes a slot
    at their peak) and about three copies of one block of rows decoded to fp32, a block being INT4_FLUSH_BLOCK_BYTES
    or one row of the whole store, whichever is larger (a flush after evictions may span every slot)."""
    if kv != "int4":
        return 0
    row = 2 * heads * slots * head_dim * 4
    block = min(batch * row, max(INT4_FLUSH_BLOCK_BYTES, row))
    return 13 * batch * heads * slots + 3 * block


def store_layout(kv: str, batch: int, heads: int, slots: int, head_dim: int, dense: str) -> Layout:
    """The tensors of one layer's store in format `kv` (a KV_FORMATS name; `dense` is the compute dtype)."""
    b, h, s, d = batch, heads, slots, head_dim
    if kv in DTYPE_BYTES:
        return [("keys", (b, h, s, d), kv), ("values", (b, h, s, d), kv)]
    if kv in ("fp8", "int8"):
        params = 1 if kv == "fp8" else 2  # fp8: a scale; int8: a scale and a zero point
        return [("data", (b, h, s, 2, d), "fp8" if kv == "fp8" else "uint8"), ("params", (b, h, s, 2, params), "fp16")]
    if kv == "int4":
        groups, tail, cg = s // INT4_GROUP, s % INT4_GROUP, d // INT4_GROUP
        return [("packed", (2, b, h, s, d // 2), "uint8"), ("key_params", (b, h, groups, 2, d), "fp16"),
                ("tail_params", (b, h, tail, 2, cg), "fp16"), ("value_params", (b, h, s, 2, cg), "fp16"),
                ("residual", (2, b, h, INT4_RESIDUAL, d), dense)]
    raise AssertionError(kv)


def cache_layout(layers: int, batch: int, heads: int, head_dim: int, kv: str, dense: str, budget: int,
                 room: int) -> Layout:
    """Every tensor of a cache's one allocation: per layer its store, its slot state (valid, true position, the
    policy's score, the newest position of each row) and its free-slot queue; one queue pointer; for a quantized
    store, one `READ_BUFFER` all layers share: the dense keys and values a read dequantizes into."""
    slots = budget + room
    rows = (batch, heads)
    queue = min(slots, room if room else QUEUE_MIN)
    out: Layout = []
    for i in range(layers):
        p = f"{i}."
        out += [(p + "store." + n, shape, t) for n, shape, t in store_layout(kv, batch, heads, slots, head_dim, dense)]
        out += [(p + "valid", (*rows, slots), "bool"), (p + "position", (*rows, slots), "int64"),
                (p + "score", (*rows, slots), "fp32"), (p + "newest", (*rows, 1), "int64"),
                (p + "queue", (*rows, queue), "int64"), (p + "slot_out", (*rows, 1), "int64")]
    out.append(("queue_ptr", (), "int64"))
    if kv not in DTYPE_BYTES:
        out.append((READ_BUFFER, (2, batch, heads, slots, head_dim), dense))
    return out


def layout_bytes(layout: Layout, align: bool = True) -> int:
    """Bytes of an allocation holding `layout`, each tensor rounded up to ALIGN (`align=False`: the tensors' own
    bytes, what their `nbytes` add up to)."""
    total = 0
    for _, shape, t in layout:
        n = ELEMENT_BYTES[t]
        for dim in shape:
            n *= dim
        total += -(-n // ALIGN) * ALIGN if align else n
    return max(total, 1)


def recall_format(kv: str) -> str:
    """The format a recall tier keeps waiting tokens in: the store's own for per-token formats; int8 for int4 (its
    keys are quantized per 64-slot group, which a tier filled a few tokens at a time cannot form)."""
    return "int8" if kv == "int4" else kv


RecordField = tuple[str, tuple[int, ...], str, int]  # (name, shape per slot, element type, byte offset)
RECALL_META = (("position", (), "int64"), ("score", (), "fp32"), ("valid", (), "bool"))


def recall_records(kv: str, head_dim: int, dense: str) -> list[tuple[list[RecordField], int]]:
    """The recall tier's host records, as (fields, bytes): every waiting slot of every (sequence, KV head) row is one
    record of each, so what one eviction moves is one contiguous span of each record buffer (one copy each way).
    The first record holds what scoring the question reads: position, score, validity and the keys (for a quantized
    format every store tensor: keys and values share them); the second, a dense format's values. Fields go largest
    element first, so each starts aligned to its type; a record is padded to 8 bytes."""
    fmt = recall_format(kv)
    store = [(name, shape[3:], t) for name, shape, t in store_layout(fmt, 1, 1, 1, head_dim, dense)]
    meta = list(RECALL_META)
    first, second = (meta + store[:1], store[1:]) if fmt in DTYPE_BYTES else (meta + store, [])
    return [_record(fields) for fields in (first, second) if fields]


def _record(fields) -> tuple[list[RecordField], int]:
    out, offset = [], 0
    for name, shape, t in sorted(fields, key=lambda f: -ELEMENT_BYTES[f[2]]):  # stable: equal sizes keep their order
        out.append((name, shape, t, offset))
        offset += math.prod(shape) * ELEMENT_BYTES[t]
    return out, -(-offset // 8) * 8


def recall_tier_bytes(layers: int, batch: int, heads: int, tokens: int, head_dim: int, kv: str, dense: str) -> int:
    """Host bytes of a recall tier holding `tokens` per row: its records (`recall_records`: the stored keys and
    values in the tier's format, each slot's position, score and validity, padding). The cache allocates it; the
    planner prices it."""
    per_slot = sum(size for _, size in recall_records(kv, head_dim, dense))
    return layers * batch * heads * tokens * per_slot
