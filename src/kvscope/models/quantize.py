"""Weight formats applied at load time with torchao (`kvscope.load(ref, weights="int4")`, `--weights`).

Every touch of torchao is in this module. The formats, their bytes and which layers they take are in
kvscope.weightformats (pure Python, what the planner prices); here they are checked against the installed torchao,
the device and the model's real modules, then applied with `torchao.quantization.quantize_` to the decoder layers'
projections only (q, k, v, o, gate, up, down): embeddings, norms and the output head keep the model dtype.

Weight quantization frees weight memory, which can then hold more KV cache; the KV cache's own format is `kv_dtype`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from kvscope.errors import usage
from kvscope.weightformats import INSTALL, INT4_WEIGHT_GROUP, TORCHAO_MIN, WeightFormat, weight_format

# the tensor subclass torchao gives each format's weights (to say what a loaded model holds)
_SUBCLASSES = {"Int8Tensor": "int8", "Float8Tensor": "fp8", "Int4TilePackedTo4dTensor": "int4"}


def import_quietly() -> Any:
    """Import torchao with its import-time warnings silenced, and return it (None when it is not installed).

    transformers imports an installed torchao with its model classes, and torchao then logs a warning for each of its
    optional C++ extensions that does not match this torch (and torch one per enum it registers); the formats kvscope
    uses need none of them. Called before a model loads, so those lines never reach a kvscope command's output."""
    import importlib.util
    import sys

    if "torchao" in sys.modules:
        return sys.modules["torchao"]
    if importlib.util.find_spec("torchao") is None:
        return None
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        import torchao
        import torchao.quantization  # noqa: F401

        with contextlib.suppress(ImportError):  # what transformers' torchao integration imports (more warnings)
            import torchao.prototype.safetensors.safetensors_support  # noqa: F401
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return torchao


def require_torchao(fmt: WeightFormat) -> Any:
    """The torchao module; a missing or too old torchao is a usage error that says what to install."""
    try:
        torchao = import_quietly()
    except ImportError as exc:
        torchao, why = None, f" ({exc})"
    else:
        why = ""
    if torchao is None:
        raise usage(f"--weights {fmt.name} quantizes with torchao, which is not installed{why}",
                    fix=f"install it: {INSTALL}, or drop --weights") from None
    version = getattr(torchao, "__version__", "unknown")
    if _older(version, TORCHAO_MIN):
        raise usage(f"--weights {fmt.name} needs torchao {TORCHAO_MIN} or newer (its Int8Tensor, Float8Tensor and "
                    f"tile-packed int4 layouts); torchao {version} is installed", fix=f"install it: {INSTALL}")
    return torchao


def _older(version: str, minimum: str) -> bool:
    def parts(v: str) -> tuple[int, ...]:
        out = []
        for piece in v.split("+")[0].split(".")[:2]:
            digits = "".join(c for c in piece if c.isdigit())
            out.append(int(digits or 0))
        return tuple(out)

    return version != "unknown" and parts(version) < parts(minimum)


def check_runnable(name: str, device: str) -> None:
    """A format that cannot run on `device` (int4 on the CPU, or on a GPU older than tinygemm's kernels) is a usage
    error that names the device it needs."""
    fmt = weight_format(name)
    if not fmt.cuda_only:
        return
    if not str(device).startswith("cuda"):
        raise usage(f"--weights {fmt.name} ({fmt.description}) {fmt.device_requirement()}: torchao has no CPU kernel "
                    f"for it; this run is on {device}", expected="--device cuda on a machine with such a GPU",
                    fix="--weights int8 or --weights fp8 on the CPU, or --device cuda")
    import torch

    capability = torch.cuda.get_device_capability(device)
    if fmt.min_capability and capability < fmt.min_capability:
        raise usage(f"--weights {fmt.name} {fmt.device_requirement()}; {torch.cuda.get_device_name(device)} has "
                    f"{capability[0]}.{capability[1]}", fix="--weights int8 or --weights fp8")


def targets(model) -> dict[str, Any]:
    """Fully qualified name -> module of the projections a weight format quantizes; a layer that is not a plain
    `torch.nn.Linear` with dense weights is a usage error (torchao's formats replace linear layers' weights)."""
    import torch

    from kvscope import _compat
    from kvscope.weightformats import layer_linears

    names = {fqn: module for fqn, module in model.named_modules()}
    base = next(fqn for fqn, m in names.items() if m is _compat.base_model(model))
    layers = _compat.decoder_layers(model)
    if not layers:
        raise usage(f"{type(model).__name__} has no decoder layers kvscope can find", fix="drop --weights")
    out = {}
    for i in range(len(layers)):
        for proj, _, _ in layer_linears(1, 1, 1, 1):
            where = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            fqn = f"{base}.layers.{i}.{where}.{proj}".lstrip(".")
            module = names.get(fqn)
            if not isinstance(module, torch.nn.Linear):
                what = "missing" if module is None else f"a {type(module).__name__}, not torch.nn.Linear"
                raise usage(f"layer {fqn} is {what}: torchao's weight formats replace linear layers' weights only",
                            expected="a LlamaForCausalLM with torch.nn.Linear projections", fix="drop --weights")
            if type(module.weight) is not torch.nn.Parameter:
                raise usage(f"layer {fqn} already holds {type(module.weight).__name__} weights (quantized): a weight "
                            "format applies to dense weights once", fix="drop --weights")
            out[fqn] = module
    return out


def config(fmt: WeightFormat, torchao) -> Any:
    """torchao's config for `fmt`; one the installed torchao lacks is a usage error."""
    q = torchao.quantization
    try:
        if fmt.name == "int8":
            return q.Int8WeightOnlyConfig()
        if fmt.name == "fp8":
            return q.Float8WeightOnlyConfig()
        from torchao.quantization.quantize_.workflows.int4.int4_packing_format import Int4PackingFormat

        return q.Int4WeightOnlyConfig(group_size=INT4_WEIGHT_GROUP,
                                      int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)
    except (AttributeError, ImportError, TypeError) as exc:
        raise usage(f"torchao {torchao.__version__} cannot do --weights {fmt.name} ({exc})",
                    fix=f"install it: {INSTALL}") from None


def quantize(model, name: str, device: str) -> None:
    """Quantize `model`'s decoder projections in place to the format `name` on `device` (checked first: the format
    runs there, torchao is installed and can do it, every projection is a dense `torch.nn.Linear`)."""
    fmt = weight_format(name)
    check_runnable(fmt.name, device)
    torchao = require_torchao(fmt)
    layers = targets(model)
    cfg = config(fmt, torchao)
    import torch

    try:
        with torch.no_grad():
            torchao.quantization.quantize_(model, cfg, filter_fn=lambda module, fqn: fqn in layers)
    except (ImportError, NotImplementedError, ValueError, AssertionError) as exc:
        raise usage(f"torchao {torchao.__version__} could not quantize the weights to {fmt.name} on {device}: "
                    f"{type(exc).__name__}: {exc}", fix="--weights or --device") from None
    left = [fqn for fqn, m in layers.items() if type(m.weight) is torch.nn.Parameter]
    if left:  # torchao skips a layer it cannot take instead of failing: say so rather than plan wrong bytes
        raise usage(f"torchao left {len(left)} layers in {fmt.name} unquantized (first: {left[0]})",
                    fix="--weights")
    if fmt.name == "int4":  # products of many rows (prefill) on the weight unpacked to bf16
        from kvscope.models.int4_prefill import replace_linears

        replace_linears(model, layers)


def weights_format_of(model) -> str | None:
    """The weight format the model's projections are in (int8, int4, fp8), or None for dense weights."""
    from kvscope import _compat

    layers = _compat.decoder_layers(model)
    if not layers:
        return None
    weight = layers[0].self_attn.q_proj.weight
    return _SUBCLASSES.get(type(weight).__name__)


def tensor_bytes(t) -> int:
    """Bytes a tensor holds, through torchao's tensor subclasses down to their inner tensors."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each tensor counted once (a tied head is the embedding)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total
