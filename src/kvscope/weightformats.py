"""Weight formats of the model's linear layers, and their exact bytes: what torchao allocates for each one.

Weight quantization frees weight memory, which can then hold more KV cache; it does not shrink the KV cache (that is
`--kv-dtype`). This module is pure Python (no torch, no torchao): the planner prices a format with it, and
`kvscope.models.quantize` applies the format with torchao and checks the same rules before it does.

What torchao 0.18 allocates per linear layer of `out` x `in` features (read from its tensor subclasses, and summed
over their inner tensors in tests/models/test_quantize.py for the formats that run on the CPU):
- `int8` weight-only (`Int8WeightOnlyConfig`, per row, `Int8Tensor`): int8 values [out, in], an fp32 scale and an
  int8 zero point per row. Its matrix product converts the int8 values to the model dtype first: a temporary of
  out x in elements in the model dtype, per product.
- `fp8` weight-only (`Float8WeightOnlyConfig`, e4m3, per row, `Float8Tensor`): fp8 values [out, in] and an fp32 scale
  per row. Its matrix product dequantizes the weight (an fp32 copy, the fp32 product, then the model dtype).
- `int4` weight-only (`Int4WeightOnlyConfig`, groups of `INT4_WEIGHT_GROUP` input channels, tinygemm's
  tile-packed layout, `Int4TilePackedTo4dTensor`; CUDA with compute capability 8.0 or newer, bf16 only): the weight
  padded to in' = a multiple of 1024 and out' = a multiple of 8, packed two values a byte (out' x in' / 2 bytes, as
  int32), and a bf16 scale and zero point per (group, row): in' / group x out' x 2 x 2 bytes. A product of fewer than
  `INT4_DEQUANT_TOKENS` rows runs on the packed weight (`aten._weight_int4pack_mm`), no weight-sized temporary (a
  padded bf16 copy of its input); a larger one on the weight unpacked to bf16 (kvscope.models.int4_prefill), which
  holds 3 x out' x in' bytes at its peak.

Only the decoder layers' projections are quantized (q, k, v, o, gate, up, down): the embeddings, the norms and the
output head stay in the model dtype (the head is left alone as transformers' torchao integration does by default;
a tied head is the embedding matrix itself).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvscope.errors import usage

INT4_WEIGHT_GROUP = 128  # input channels per int4 scale / zero point (torchao's default group size)
INT4_PAD_IN = 1024  # tinygemm pads the input features to a multiple of this (inner_k_tiles 8 x 16 x 8)
INT4_PAD_OUT = 8  # and the output features to a multiple of its n-tile
INT4_DEQUANT_TOKENS = 1024  # an int4 product of this many rows or more runs on the weight unpacked to bf16
TORCHAO_MIN = "0.18"  # the oldest torchao whose tensor subclasses and packing formats kvscope uses
INSTALL = "pip install 'torchao>=0.18'  (or: pip install 'kvscope[weights]')"
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class WeightFormat:
    """One weight format: its name, what it is, where it runs, and the bytes of one linear layer in it."""

    name: str
    description: str
    cuda_only: bool = False
    min_capability: tuple[int, int] | None = None  # on CUDA
    dtypes: tuple[str, ...] = ("fp32", "bf16", "fp16")  # model dtypes it accepts
    # sets of product temporaries a prefill leaves reserved but unallocated, beyond a dense prefill's slack: a freed
    # temporary's block is split by the activations before the next product asks for its size again, so the allocator
    # takes a new one. Measured on the H200 (llama-3.1-8b shape, 4096 + 16 tokens, kvscope runtime, torchao 0.18,
    # docs/benchmarks.md weights-cuda): fp8 at 247 sequences reserved 2,034 MiB above its allocated peak, one set
    # (560 MiB) more than the dense slack (the planner then reserves 142,123 MiB against 142,104 measured; without it,
    # it said 248, which ran out of memory); int8 at 249 reserved 809 MiB above its peak, within the dense slack: 0.
    # int4 (prefill on the unpacked weight; dbe6ab7 and 2ace86f): 255 ran in two processes, reserving 984 and 878 MiB
    # above its allocated peak, within the dense slack: 0 (256 ran in one, ran out of memory in decode in the other).
    prefill_slack_sets: int = 0

    def linear_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes torchao allocates for one `out_features` x `in_features` weight in this format."""
        n, k = out_features, in_features
        if self.name == "int8":
            return n * k + n * 4 + n  # int8 values, fp32 scale and int8 zero point per row
        if self.name == "fp8":
            return n * k + n * 4  # fp8 values, fp32 scale per row
        n_pad, k_pad = _round_up(n, INT4_PAD_OUT), _round_up(k, INT4_PAD_IN)
        return n_pad * k_pad // 2 + (k_pad // INT4_WEIGHT_GROUP) * n_pad * 2 * 2

    def product_temporary_bytes(self, out_features: int, in_features: int, dtype: str, tokens: int = 1) -> int:
        """Bytes one matrix product of `tokens` rows holds besides its input and output (torchao 0.18's code paths):
        int8 converts the weight to the model dtype and scales a copy of the product; fp8 dequantizes the weight
        through fp32 (the fp32 copy, the fp32 product, the result); int4 pads a bf16 copy of the input to in', or
        from INT4_DEQUANT_TOKENS rows unpacks the weight (its codes in two orders, then bf16)."""
        n, k, s = out_features, in_features, _BYTES[dtype]
        if self.name == "int8":
            return n * k * s + tokens * n * s
        if self.name == "fp8":
            return n * k * (4 + 4 + s)
        k_pad = _round_up(k, INT4_PAD_IN)
        if tokens >= INT4_DEQUANT_TOKENS:
            return 3 * _round_up(n, INT4_PAD_OUT) * k_pad
        return tokens * k_pad * 2

    def device_requirement(self) -> str:
        if not self.cuda_only:
            return "runs on CUDA GPUs and on the CPU"
        major, minor = self.min_capability or (0, 0)
        return f"needs a CUDA GPU of compute capability {major}.{minor} or newer"


WEIGHT_FORMATS: dict[str, WeightFormat] = {f.name: f for f in [
    WeightFormat("int8", "int8 weight-only, one scale per output row"),
    WeightFormat("int4", f"int4 weight-only, groups of {INT4_WEIGHT_GROUP} input channels (tinygemm layout)",
                 cuda_only=True, min_capability=(8, 0), dtypes=("bf16",)),
    WeightFormat("fp8", "fp8 (e4m3) weight-only, one scale per output row", prefill_slack_sets=1),
]}


def weight_format(name: str) -> WeightFormat:
    """The format called `name`; anything else is a usage error naming `--weights`."""
    key = str(name).strip().lower()
    if key not in WEIGHT_FORMATS:
        raise usage(f"unknown weight format {name!r}", expected=", ".join(WEIGHT_FORMATS) + " (or none: the model "
                    "dtype)", fix="--weights")
    return WEIGHT_FORMATS[key]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def layer_linears(hidden: int, intermediate: int, q_dim: int, kv_dim: int) -> list[tuple[str, int, int]]:
    """(name, out, in) of the projections of one Llama decoder layer, the ones a weight format quantizes."""
    return [("q_proj", q_dim, hidden), ("k_proj", kv_dim, hidden), ("v_proj", kv_dim, hidden),
            ("o_proj", hidden, q_dim), ("gate_proj", intermediate, hidden), ("up_proj", intermediate, hidden),
            ("down_proj", hidden, intermediate)]


def check_format(fmt: WeightFormat, dtype: str, linears: list[tuple[str, int, int]], model: str) -> None:
    """A format that cannot hold this model in this dtype is a usage error, before anything is loaded: int4 takes bf16
    only and needs every quantized layer's input features to be a multiple of its group size (torchao would leave the
    others unquantized, silently)."""
    if dtype not in fmt.dtypes:
        raise usage(f"--weights {fmt.name} ({fmt.description}) takes {' or '.join(fmt.dtypes)} models, not {dtype}",
                    expected=f"--dtype {fmt.dtypes[0]}", fix="--dtype or --weights")
    if fmt.name == "int4":
        odd = sorted({k for _, _, k in linears if k % INT4_WEIGHT_GROUP})
        if odd:
            raise usage(f"--weights int4 quantizes groups of {INT4_WEIGHT_GROUP} input channels, but {model} has "
                        f"layers with {', '.join(map(str, odd))} input features (not a multiple of "
                        f"{INT4_WEIGHT_GROUP})", expected=f"a model whose hidden and intermediate sizes are multiples "
                        f"of {INT4_WEIGHT_GROUP}", fix="--weights int8 or --weights fp8")
