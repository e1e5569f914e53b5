"""`ModelSpec`: the architecture facts every other module uses, read from a Hugging Face config."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvscope.errors import usage
from kvscope.kvformats import DTYPE_BYTES, INT4_GROUP, dense_dtype, kv_format
from kvscope.weightformats import layer_linears, weight_format

# Decoders whose attention is standard multi-head / grouped-query attention with a Llama-shaped block
# (q/k/v/o projections, gated MLP, RMSNorm, RoPE). Everything else is refused by name.
SUPPORTED_MODEL_TYPES = ("llama",)


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a Llama-architecture decoder, enough to price weights, KV cache and activations.

    >>> spec = ModelSpec.from_catalogue("llama-3-8b")
    >>> spec.kv_bytes_per_token("bf16")
    131072
    """

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: Any, *, name: str | None = None, source: str = "") -> ModelSpec:
        """Read a `transformers` config object, or the dict of a config.json.

        Raises `UsageError` for anything that is not a Llama-architecture decoder with MHA/GQA attention.
        """
        cfg = config if isinstance(config, dict) else config.to_dict()
        model_type = cfg.get("model_type", "")
        archs = cfg.get("architectures") or []
        label = "/".join(archs) or model_type or "unknown"
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise usage(
                f"unsupported architecture {label!r} (model_type {model_type!r}): kvscope handles decoders with "
                "standard multi-head or grouped-query attention of the Llama family",
                expected="model_type 'llama' (Llama 3, 3.1, 3.2, 3.3, SmolLM2 and other LlamaForCausalLM models)",
                fix="the MODEL argument",
            )
        if cfg.get("is_encoder_decoder"):
            raise usage(f"{label} is an encoder-decoder model", expected="a decoder-only model", fix="MODEL")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in cfg]
        if missing:
            raise usage(f"config of {label} lacks {', '.join(missing)}", expected="a complete config.json", fix="MODEL")
        heads = _positive(cfg, "num_attention_heads", label)
        kv_heads = _positive(cfg, "num_key_value_heads", label, default=heads)
        hidden = _positive(cfg, "hidden_size", label)
        head_dim = _positive(cfg, "head_dim", label, default=hidden // heads)
        if heads % kv_heads:
            raise usage(
                f"{label}: {heads} attention heads are not a multiple of {kv_heads} KV heads",
                expected="grouped-query attention with num_attention_heads % num_key_value_heads == 0",
                fix="the model's config.json",
            )
        rope = _rope(cfg)
        return cls(
            name=name or cfg.get("_name_or_path") or label,
            num_layers=_positive(cfg, "num_hidden_layers", label),
            hidden_size=hidden,
            intermediate_size=_positive(cfg, "intermediate_size", label, default=4 * hidden),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=_positive(cfg, "vocab_size", label),
            max_position_embeddings=_positive(cfg, "max_position_embeddings", label, default=2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_scaling=rope.get("scaling"),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            model_type=model_type,
            source=source,
        )

    @classmethod
    def from_config_file(cls, path: str | Path, *, name: str | None = None) -> ModelSpec:
        """Read a config.json (or a directory holding one) without importing transformers."""
        path = Path(path).expanduser()
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise usage(f"no config.json in {path}", expected="a Hugging Face model directory", fix="MODEL")
        try:
            cfg = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise usage(f"cannot read {file}: {exc}", expected="a valid JSON config.json", fix="MODEL") from None
        if not isinstance(cfg, dict):
            raise usage(f"{file} holds {type(cfg).__name__}, not a JSON object", fix="MODEL")
        return cls.from_hf_config(cfg, name=name or path.name, source=str(file))

    @classmethod
    def from_catalogue(cls, name: str) -> ModelSpec:
        from kvscope.models.catalogue import catalogue_entry

        entry = catalogue_entry(name)
        return cls.from_hf_config(entry.config, name=entry.name, source=entry.source)

    # ---- sizes --------------------------------------------------------------------------------------------------
    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    def layer_params(self) -> int:
        """Parameters of one decoder layer: attention, gated MLP and the two RMSNorm weights."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        if self.attention_bias:
            attn += self.q_dim + 2 * self.kv_dim + h
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        return attn + mlp + 2 * h

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def num_params(self) -> int:
        """All parameters; a tied output head shares the embedding and is counted once."""
        head = 0 if self.tie_word_embeddings else self.embedding_params()
        return self.embedding_params() + head + self.num_layers * self.layer_params() + self.hidden_size

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, out features, in features) of one decoder layer's projections: what a weight format quantizes."""
        return layer_linears(self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim)

    def weights_bytes(self, dtype: str = "bf16", tp: int = 1, embedding_split: bool | None = None,
                      weights: str | None = None) -> int:
        """Bytes of weights on one GPU under transformers' Llama tensor-parallel plan (`LlamaConfig.base_model_tp_plan`
        and `LlamaForCausalLM._tp_plan`): q/k/v/gate/up colwise and o/down rowwise are split `tp` ways, and so is an
        untied `lm_head` (colwise, output gathered); the RMSNorm weights are replicated on every rank. The embedding is
        split on the vocabulary from transformers 5.24 on (its plan adds `embed_tokens: embedding_rowwise`) and
        replicated in 5.17: `embedding_split` None asks the installed transformers (`_compat.tp_splits_embedding`).

        `weights` (int8, int4, fp8: kvscope.weightformats; one GPU only) prices the decoder layers' projections as
        torchao stores them; embeddings, norms, biases and the output head stay in `dtype`.

        >>> spec = ModelSpec.from_catalogue("llama-3.1-70b")
        >>> h, n, e = spec.hidden_size, spec.num_layers, spec.embedding_params()
        >>> spec.weights_bytes("bf16", tp=2, embedding_split=False) == (n * (spec.layer_params() - 2 * h) // 2
        ...     + (2 * n + 1) * h + e + e // 2) * 2
        True
        >>> spec = ModelSpec.from_catalogue("llama-3.1-8b")
        >>> spec.weights_bytes("bf16"), spec.weights_bytes("bf16", weights="int8")
        (16060522496, 9088081920)
        """
        b = DTYPE_BYTES[dense_dtype(dtype)]
        if weights is not None:
            fmt = weight_format(weights)
            dense = self.num_params() - self.num_layers * sum(n * k for _, n, k in self.linears())
            quantized = self.num_layers * sum(fmt.linear_bytes(n, k) for _, n, k in self.linears())
            return dense * b + quantized
        if tp == 1:
            return self.num_params() * b
        if embedding_split is None:
            from kvscope import _compat

            embedding_split = _compat.tp_splits_embedding()
        return self.weights_params_per_rank(tp, embedding_split) * b

    def weights_params_per_rank(self, tp: int, embedding_split: bool = False) -> int:
        """Parameters one rank holds under the tensor-parallel plan (see `weights_bytes`)."""
        h = self.hidden_size
        norms = (2 * self.num_layers + 1) * h
        layer_split = self.layer_params() - 2 * h  # the seven projections (and their biases)
        replicated_bias = h * (int(self.attention_bias) + int(self.mlp_bias))  # o_proj / down_proj bias: rowwise
        layers = self.num_layers * (-(-(layer_split - replicated_bias) // tp) + replicated_bias)
        split = -(-self.embedding_params() // tp)
        embedding = split if embedding_split else self.embedding_params()
        head = 0 if self.tie_word_embeddings else split  # a tied head is the embedding itself
        return layers + norms + embedding + head

    def kv_heads_per_gpu(self, tp: int = 1) -> int:
        """KV heads one GPU holds: split across ranks, replicated when there are more ranks than KV heads."""
        return max(1, self.num_kv_heads // tp)

    def kv_bytes_per_token(self, kv_dtype: str = "bf16", tp: int = 1) -> int:
        """Exact bytes of keys and values one token adds across all layers on one GPU.

        >>> ModelSpec.from_catalogue("llama-3-8b").kv_bytes_per_token("bf16")  # 2 * 32 * 8 * 128 * 2
        131072
        """
        fmt = kv_format(kv_dtype)
        per_head = fmt.bytes_per_head_token(self.head_dim, DTYPE_BYTES.get(fmt.name, 2))
        return self.num_layers * self.kv_heads_per_gpu(tp) * per_head

    def supports_kv_dtype(self, kv_dtype: str) -> bool:
        """Whether kvscope's cache can store this model's KV in `kv_dtype` (int4 packs channels in groups of 64)."""
        return kv_format(kv_dtype).name != "int4" or self.head_dim % INT4_GROUP == 0

    def kv_fixed_bytes(self, kv_dtype: str, dense: str = "bf16", tp: int = 1) -> int:
        """Bytes a KV format needs regardless of tokens (int4's full-precision window), across all layers."""
        fmt = kv_format(kv_dtype)
        dense_token = 2 * self.head_dim * DTYPE_BYTES[dense_dtype(dense)]
        return fmt.residual_tokens() * self.num_layers * self.kv_heads_per_gpu(tp) * dense_token

    def describe_rope(self) -> str:
        if not self.rope_scaling:
            return f"RoPE theta {self.rope_theta:g}, no scaling"
        s = self.rope_scaling
        return (
            f"RoPE theta {self.rope_theta:g}, {s.get('rope_type', '?')} scaling factor {s.get('factor', '?')} "
            f"from {s.get('original_max_position_embeddings', '?')} positions"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d["num_params"] = self.num_params()
        return d


def _positive(cfg: dict[str, Any], key: str, label: str, default: int | None = None) -> int:
    """A config value that must be a whole number >= 1 (a missing or null value takes `default`)."""
    value = cfg.get(key)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise usage(f"config of {label}: {key} must be a whole number >= 1, got {value!r}",
                    expected="a valid config.json", fix="the model's config.json")
    return int(value)


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """RoPE theta and scaling from either the 4.x keys (rope_theta, rope_scaling) or 5.x's rope_parameters."""
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or None
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling and scaling.get("type") and not scaling.get("rope_type"):
        scaling = {**scaling, "rope_type": scaling["type"]}
    return {"rope_theta": theta, "scaling": scaling}
