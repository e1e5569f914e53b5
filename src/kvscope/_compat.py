"""Every touch of `transformers` internals lives here.

The cache and model APIs moved between 5.x releases (we support 5.17 through 5.24: kvscope.env holds the range, and CI
runs the suite on both ends); keeping the touches in one module means a new release breaks one file, and tests of this
module tell which.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import torch


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and advisory warnings (kvscope shows its own progress)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def llama_config(values: dict[str, Any]):
    from transformers import LlamaConfig

    return LlamaConfig(**values)


def build_random_model(config_values: dict[str, Any], dtype: torch.dtype, device: str | torch.device,
                       attn_implementation: str = "sdpa", seed: int = 0):
    """A `LlamaForCausalLM` with random weights, built directly on `device` in `dtype` (no CPU copy, no fp32 pass)."""
    from transformers import LlamaForCausalLM

    config = llama_config(config_values)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def from_pretrained(path: str, dtype: torch.dtype, device: str | torch.device, attn_implementation: str = "sdpa",
                    gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.to(device).eval()


def config_from_gguf(path: str):
    from transformers import AutoConfig

    directory, name = os.path.split(path)
    return AutoConfig.from_pretrained(directory or ".", gguf_file=name)


def tokenizer_from_pretrained(path: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(path, **kwargs)


def save_dequantized(model, tokenizer, directory: str) -> None:
    """Write a GGUF-loaded model as safetensors + config (transformers refuses `save_pretrained` on GGUF models)."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(directory)


def decoder_layers(model) -> list:
    """The decoder layers of a causal LM (`model.model.layers` for Llama)."""
    return list(base_model(model).layers)


def base_model(model):
    return model.model if hasattr(model, "model") else model


def attention_implementation(model) -> str:
    return str(getattr(model.config, "_attn_implementation", "sdpa") or "sdpa")


# --- the cache and attention hooks (kvscope.cache) -------------------------------------------------------------------

KVSCOPE_ATTENTION = "kvscope_budgeted"


def cache_base_classes():
    """(`Cache`, `CacheLayerMixin`): the 5.x per-layer cache API that `BudgetedCache` implements."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    return Cache, CacheLayerMixin


def register_attention(function) -> None:
    """Register kvscope's attention under `KVSCOPE_ATTENTION` (idempotent). It is deliberately *not* registered as a
    mask function: transformers then skips building a causal mask for it (the cache builds its own per layer)."""
    from transformers import AttentionInterface

    AttentionInterface.register(KVSCOPE_ATTENTION, function)


def sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def swap_attention_implementation(model, name: str) -> str:
    """Set the attention implementation every layer reads at call time; return the previous one."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    return previous


def forward_cache_argument(kwargs: dict):
    """The cache passed to a decoder forward: `past_key_values=` (5.17) or `cache=` (5.23 renamed it)."""
    cache = kwargs.get("past_key_values")
    return cache if cache is not None else kwargs.get("cache")


def hold_forward_hooks(model, before, after):
    """Call `before(module, kwargs)` and `after(module)` around every forward of the base decoder while some holder
    needs them; returns the holder's release function. The hooks are installed for the first holder and removed with
    the last, so a model no kvscope cache uses any more is left exactly as it was.

    `after` runs even when the forward raises, so an interrupted run never leaves the model switched to kvscope's
    attention."""
    base = base_model(model)
    state = base.__dict__.get("_kvscope_hooks")
    if state is None:
        def pre(module, args, kwargs):
            if args:
                kwargs = {"input_ids": args[0], **kwargs}
            before(module, kwargs)

        def post(module, args, kwargs, output):
            after(module)

        handles = [base.register_forward_pre_hook(pre, with_kwargs=True),
                   base.register_forward_hook(post, with_kwargs=True, always_call=True)]
        state = base.__dict__["_kvscope_hooks"] = {"handles": handles, "holders": 0}
    state["holders"] += 1

    def release() -> None:
        state["holders"] -= 1
        if state["holders"] == 0 and base.__dict__.get("_kvscope_hooks") is state:
            for handle in state["handles"]:
                handle.remove()
            del base.__dict__["_kvscope_hooks"]

    return release


def forward_hooks_held(model) -> int:
    """How many holders keep kvscope's hooks on this model (0: none installed)."""
    state = base_model(model).__dict__.get("_kvscope_hooks")
    return state["holders"] if state else 0


def layer_index(attention_module) -> int:
    return int(attention_module.layer_idx)


def attention_heads(model) -> tuple[int, int, int, int]:
    """(layers, query heads, KV heads, head_dim) from the model's config; under tensor parallelism, the heads of this
    rank's shard (k_proj and q_proj are split colwise, by whole heads)."""
    c = model.config
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    tp = tensor_parallel_degree(model)
    return c.num_hidden_layers, heads // tp, kv_heads // tp, getattr(c, "head_dim", None) or c.hidden_size // heads


def tensor_parallel_degree(model) -> int:
    """How many ranks the model's projections are split over (1: not tensor-parallel). transformers keeps its TP
    parameters as DTensors; a rank's k_proj holds `kv_heads / tp` whole heads."""
    layers = decoder_layers(model)
    weight = getattr(getattr(getattr(layers[0], "self_attn", None), "k_proj", None), "weight", None) if layers else None
    mesh = getattr(weight, "device_mesh", None)
    return int(mesh.size()) if mesh is not None else 1


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor parameter (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def llama_tp_plan(model) -> dict[str, str]:
    """The model's own tensor-parallel plan (`base_model_tp_plan` of its config and `_tp_plan` of the head)."""
    plan = dict(getattr(model, "tp_plan", None) or {})
    if not plan:
        base = getattr(model.config, "base_model_tp_plan", None) or {}
        plan = {f"{model.base_model_prefix}.{k}": v for k, v in base.items()}
        plan.update(getattr(type(model), "_tp_plan", None) or {})
    return plan


@functools.cache
def tp_splits_embedding() -> bool:
    """Whether the installed transformers shards a Llama's `embed_tokens` under tensor parallelism: 5.24's
    `init_parallel_plans` adds `embed_tokens: embedding_rowwise` to every plan, 5.17 leaves the embedding whole."""
    try:
        from transformers.distributed import mixin
    except ImportError:
        return False
    import inspect

    return "embedding_rowwise" in inspect.getsource(mixin.DistributedMixin.init_parallel_plans)


def apply_tensor_parallel(model, mesh):
    """Shard `model` over the 1-D device `mesh` with transformers' own tensor-parallel machinery and the model's own
    plan: each rank slices its shard of every planned parameter from its own copy (no communication: every rank must
    hold the same weights, e.g. built from the same seed), and the planned modules get transformers' TP forwards.
    5.17 reads the plan from the model (`apply_tensor_parallelism(model, mesh)`); 5.24 takes it expanded per layer."""
    import inspect

    from transformers.distributed import tensor_parallel as tp

    apply = tp.apply_tensor_parallelism
    if len(inspect.signature(apply).parameters) >= 3:
        apply(model, mesh, model._expand_parallel_plan(llama_tp_plan(model)))
    else:
        apply(model, mesh)
    model._device_mesh, model._tp_size = mesh, int(mesh.size())
    return model


def from_pretrained_tensor_parallel(path: str, dtype: torch.dtype, mesh, attn_implementation: str = "sdpa"):
    """A local model directory loaded by transformers straight into this rank's shards (`tp_plan="auto"`)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                tp_plan="auto", device_mesh=mesh).eval()


def random_shards(model, device, std: float = 0.02) -> None:
    """Materialize a model built on the meta device and sharded by `apply_tensor_parallel`: every rank draws its own
    shards at random on `device` (shape-only runs of models too large for one device: no rank ever holds the whole
    model). Norm weights are ones; the rotary embedding is rebuilt on `device`."""
    from torch.distributed.tensor import DTensor

    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            ones = "norm" in type(module).__name__.lower()
            if isinstance(p, DTensor):
                local = torch.empty(p.to_local().shape, dtype=p.dtype, device=device)
                local.fill_(1.0) if ones else local.normal_(0.0, std)
                value = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                           stride=p.stride())
            else:
                value = torch.empty(p.shape, dtype=p.dtype, device=device)
                value.fill_(1.0) if ones else value.normal_(0.0, std)
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    base = base_model(model)
    base.rotary_emb = type(base.rotary_emb)(config=model.config, device=device)


def cache_keyword(model) -> str:
    """The forward/generate keyword for the cache: `cache` from 5.23 on, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"



def dynamic_cache(model):
    """The default cache of plain `generate()`, created here so the caller can measure it after an OOM."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def dynamic_cache_tensors(cache) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """(keys, values) per layer of a DynamicCache (None where a layer holds nothing yet)."""
    return [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in getattr(cache, "layers", [])]


def step_callback_processor(callback):
    """A LogitsProcessor that calls `callback(step)` at every decode step of `generate()` and changes nothing."""
    from transformers import LogitsProcessor

    class _Marker(LogitsProcessor):
        def __init__(self):
            self.step = 0

        def __call__(self, input_ids, scores):
            callback(self.step)
            self.step += 1
            return scores

    return _Marker()


# --- kvscope's own decode step (kvscope.runtime.step) -----------------------------------------------------------------


class DecodeLayerWeights(NamedTuple):
    input_norm: torch.Tensor
    q: tuple[torch.Tensor, torch.Tensor | None]  # (weight, bias) of each projection
    k: tuple[torch.Tensor, torch.Tensor | None]
    v: tuple[torch.Tensor, torch.Tensor | None]
    o: tuple[torch.Tensor, torch.Tensor | None]
    post_norm: torch.Tensor
    gate: tuple[torch.Tensor, torch.Tensor | None]
    up: tuple[torch.Tensor, torch.Tensor | None]
    down: tuple[torch.Tensor, torch.Tensor | None]
    qkv: torch.Tensor | None = None  # q, k and v stacked in one buffer (fuse_projections): one matrix product
    gate_up: torch.Tensor | None = None  # gate and up stacked likewise


class DecodeWeights(NamedTuple):
    """What a Llama decode step reads, taken from the model's own modules (no copies)."""

    embed: torch.Tensor
    layers: list[DecodeLayerWeights]
    norm: torch.Tensor
    lm_head: tuple[torch.Tensor, torch.Tensor | None]
    rotary: Any  # the model's rotary embedding: rotary(x, position_ids) -> (cos, sin), each [B, q, head_dim]
    eps: float
    scaling: float
    heads: int
    kv_heads: int
    head_dim: int


def _linear(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return module.weight, module.bias


def decode_weights(model) -> DecodeWeights | None:
    """The tensors of a Llama-architecture causal LM's decode step, or None when the model is not one kvscope's own
    step reproduces (another architecture, another activation or norm): the caller then decodes with the model's
    forward."""
    c = model.config
    base = base_model(model)
    layers = list(getattr(base, "layers", []))
    if getattr(c, "model_type", None) != "llama" or getattr(c, "hidden_act", "silu") != "silu" or not layers:
        return None
    if tensor_parallel_degree(model) > 1:  # kvscope's own step has no collectives: sharded models use their forward
        return None
    if not all(hasattr(x, "self_attn") and hasattr(x, "mlp") and hasattr(x.mlp, "gate_proj") for x in layers):
        return None
    first = layers[0].self_attn
    out = []
    for x in layers:
        a, m = x.self_attn, x.mlp
        out.append(DecodeLayerWeights(x.input_layernorm.weight, _linear(a.q_proj), _linear(a.k_proj),
                                      _linear(a.v_proj), _linear(a.o_proj), x.post_attention_layernorm.weight,
                                      _linear(m.gate_proj), _linear(m.up_proj), _linear(m.down_proj),
                                      _stacked(a.q_proj, a.k_proj, a.v_proj), _stacked(m.gate_proj, m.up_proj)))
    heads, kv_heads, head_dim = attention_heads(model)[1:]
    return DecodeWeights(base.embed_tokens.weight, out, base.norm.weight, _linear(model.lm_head), base.rotary_emb,
                         float(getattr(c, "rms_norm_eps", 1e-6)), float(first.scaling), heads, kv_heads, head_dim)


def _stacked(*modules) -> torch.Tensor | None:
    """The one buffer these linear layers' weights are consecutive rows of (fuse_projections made it), or None."""
    weights = [m.weight for m in modules]
    if any(m.bias is not None for m in modules) or any(type(w) is not torch.nn.Parameter and
                                                          type(w) is not torch.Tensor for w in weights):
        return None
    first = weights[0]
    storage = first.untyped_storage().data_ptr()
    end = first.data_ptr()
    for w in weights:
        if (w.untyped_storage().data_ptr() != storage or w.data_ptr() != end or not w.is_contiguous()
                or w.shape[1:] != first.shape[1:]):
            return None  # one buffer only: tensors that merely sit side by side in memory are not one
        end += w.numel() * w.element_size()
    rows = sum(w.shape[0] for w in weights)
    return torch.as_strided(first.detach(), (rows, *first.shape[1:]), first.stride())


def fuse_projections(model) -> bool:
    """Put each Llama layer's q/k/v weights, and its gate/up weights, in one buffer each (the modules' weights become
    views of it, no copy kept), so kvscope's decode step runs one matrix product where it ran three (or two): at batch
    1 the small k and v products reach about half the memory bandwidth of a large one. The model computes exactly as
    before. A model saved afterwards with `save_pretrained` sees weights sharing memory. Returns whether it applied."""
    base = base_model(model)
    layers = list(getattr(base, "layers", []))
    if getattr(model.config, "model_type", None) != "llama" or not layers:
        return False
    with torch.no_grad():
        for x in layers:
            for modules in ((x.self_attn.q_proj, x.self_attn.k_proj, x.self_attn.v_proj),
                            (x.mlp.gate_proj, x.mlp.up_proj)):
                if _stacked(*modules) is not None or any(m.bias is not None for m in modules):
                    continue
                if any(type(m.weight) is not torch.nn.Parameter for m in modules):
                    return False  # quantized or otherwise wrapped weights: leave them alone
                fused = torch.cat([m.weight for m in modules])
                start = 0
                for m in modules:
                    rows = m.weight.shape[0]
                    m.weight = torch.nn.Parameter(fused[start:start + rows], requires_grad=m.weight.requires_grad)
                    start += rows
                del fused
    return True
