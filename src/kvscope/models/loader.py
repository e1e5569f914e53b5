"""`load(ref)`: a model, its tokenizer and its `ModelSpec`, from a local directory, a GGUF, the embedded default
or a catalogue shape with random weights."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

from kvscope.errors import usage
from kvscope.models import catalogue
from kvscope.models.embedded import EMBEDDED_NAME, ensure_converted
from kvscope.models.spec import ModelSpec


class LoadedModel(NamedTuple):
    model: Any
    tokenizer: Any  # None for random-weight catalogue shapes
    spec: ModelSpec


def resolve_device(device: str | None) -> str:
    """"auto" (or None) -> cuda when available, else cpu; "cpu", "cuda", "cuda:N" are checked against this machine.

    Anything else (mps, tpu...) is a usage error: kvscope runs on CUDA GPUs and on the CPU."""
    import torch

    name = "auto" if device is None else str(device).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if not re.fullmatch(r"cuda(:[0-9]+)?", name):
        raise usage(f"unknown device {device!r}: kvscope runs on CUDA GPUs and on the CPU",
                    expected="auto, cpu, cuda or cuda:N", fix="--device")
    if not torch.cuda.is_available():
        raise usage(f"device {device!r} was asked for but CUDA is not available here", expected="cpu",
                    fix="--device")
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise usage(f"device {device!r} was asked for but this machine has {torch.cuda.device_count()} CUDA "
                    "device(s)", expected=f"cuda:0 to cuda:{torch.cuda.device_count() - 1}", fix="--device")
    return name


def resolve_dtype(dtype: str | None, device: str):
    import torch

    from kvscope.kvformats import dense_dtype

    name = dense_dtype(dtype) if dtype else ("bf16" if device.startswith("cuda") else "fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def spec_for(ref: str) -> ModelSpec:
    """The `ModelSpec` of a model reference, reading only its config (no weights, no torch)."""
    if catalogue.is_catalogue_name(ref):
        return ModelSpec.from_catalogue(ref)
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        return _gguf_spec(path)
    if path.exists():
        return ModelSpec.from_config_file(path)
    raise _unknown(ref)


def load(ref: str, *, random_weights: bool = False, dtype: str | None = None, device: str | None = None,
         weights: str | None = None, attn_implementation: str = "sdpa", seed: int = 0,
         on_notice=None) -> LoadedModel:
    """Load a model for inference.

    `ref` is a local Hugging Face model directory, a `.gguf` file, the embedded default `smollm2-135m`, or a catalogue
    name with `random_weights=True` for shape-only runs (built directly on the device in `dtype`). A GGUF is
    dequantized once and cached (models.embedded); `on_notice(text)` hears when that happens, and why (default: a
    warning when a broken cached conversion is rebuilt).

    `weights` ("int8", "int4", "fp8"; kvscope.weightformats) quantizes the decoder layers' projections with torchao
    right after loading (`pip install 'kvscope[weights]'`); int4 needs a CUDA GPU. It frees weight memory, which can
    then hold more KV cache; it does not change the KV cache's format (`kv_dtype` does).

    >>> model, tokenizer, spec = load("smollm2-135m")          # doctest: +SKIP
    >>> model, _, spec = load("llama-3-8b", random_weights=True, device="cuda")  # doctest: +SKIP
    """
    from kvscope import _compat

    _compat.quiet_transformers()
    _quiet_torchao()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if weights is not None:
        _check_weights(ref, weights, torch_dtype, dev)
    if random_weights:
        entry = catalogue.catalogue_entry(ref) if catalogue.is_catalogue_name(ref) else None
        values = entry.config if entry else _config_values(ref)
        model = _compat.build_random_model(values, torch_dtype, dev, attn_implementation, seed)
        _finish(model, dev, weights)
        spec = ModelSpec.from_hf_config(values, name=entry.name if entry else Path(ref).name,
                                        source=entry.source if entry else str(ref))
        return LoadedModel(model, None, spec)
    notice = on_notice or _warn_if_rebuilt
    if ref.strip().lower() == EMBEDDED_NAME:
        path = ensure_converted(on_notice=notice)
        return _load_dir(path, torch_dtype, dev, attn_implementation, name=EMBEDDED_NAME, weights=weights)
    if catalogue.is_catalogue_name(ref):
        raise usage(
            f"no weights for {ref!r} on this machine (the catalogue holds shapes only)",
            expected=f"a local model directory or .gguf file, or the embedded {EMBEDDED_NAME}",
            fix="pass --random-weights for a shape-only run, or give a local path as MODEL",
        )
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise usage(f"GGUF file not found: {path}", fix="the MODEL argument")
        spec_for(str(path))  # reads the metadata: a broken or non-Llama file fails here, before any dequantizing
        converted = ensure_converted(path, on_notice=notice)
        return _load_dir(converted, torch_dtype, dev, attn_implementation, name=path.stem, weights=weights)
    if path.is_dir():
        return _load_dir(path, torch_dtype, dev, attn_implementation, name=path.name, weights=weights)
    raise _unknown(ref)


def model_directory(ref: str) -> tuple[Path, str]:
    """The local model directory behind `ref` and the name to report (the embedded model and a GGUF: their cached
    conversion), for loaders that read a directory themselves (tensor parallel)."""
    if ref.strip().lower() == EMBEDDED_NAME:
        return ensure_converted(on_notice=_warn_if_rebuilt), EMBEDDED_NAME
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        spec_for(str(path))
        return ensure_converted(path, on_notice=_warn_if_rebuilt), path.stem
    if path.is_dir():
        return path, path.name
    raise _unknown(ref)


def _load_dir(path: Path, torch_dtype, device: str, attn_implementation: str, *, name: str,
              weights: str | None = None) -> LoadedModel:
    from kvscope import _compat

    spec = ModelSpec.from_config_file(path, name=name)  # validates config.json before touching weights
    files = list(path.glob("*.safetensors")) + list(path.glob("*.safetensors.index.json"))
    if not files:
        raise usage(f"no safetensors weights in {path}", expected="model.safetensors or sharded "
                    "model-0000x-of-0000y.safetensors with model.safetensors.index.json",
                    fix="MODEL, or --random-weights for a shape-only run")
    try:
        model = _compat.from_pretrained(str(path), torch_dtype, device, attn_implementation)
    except Exception as exc:  # noqa: BLE001 - sorted below: a broken file is the user's, anything else is ours
        if not _is_broken_file(exc):
            raise
        raise usage(f"cannot read the weights in {path}: {type(exc).__name__}: {exc}", expected="complete "
                    "safetensors files (a truncated or partly downloaded file gives this)",
                    fix="MODEL (download or save the model again)") from None
    _finish(model, device, weights)
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        tokenizer = _compat.tokenizer_from_pretrained(str(path))
    return LoadedModel(model, tokenizer, spec)


def _quiet_torchao() -> None:
    """An installed torchao, imported by transformers with the model classes, imports without its warnings."""
    import contextlib

    from kvscope.models.quantize import import_quietly

    with contextlib.suppress(Exception):  # a broken torchao matters only to --weights, which says so itself
        import_quietly()


def _check_weights(ref: str, weights: str, torch_dtype, device: str) -> None:
    """A weight format that cannot hold this model, or run here, fails before any weights are read."""
    import torch

    from kvscope.models.quantize import check_runnable, require_torchao
    from kvscope.weightformats import check_format, weight_format

    fmt = weight_format(weights)
    check_runnable(fmt.name, device)  # the device first: int4 on the CPU fails here whatever the dtype
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[torch_dtype]
    spec = ModelSpec.from_hf_config(catalogue.catalogue_entry(ref).config, name=ref) if (
        catalogue.is_catalogue_name(ref)) else None
    if spec is None and Path(ref).expanduser().exists():
        spec = spec_for(ref)
    if spec is not None:
        check_format(fmt, dtype, spec.linears(), spec.name)
    require_torchao(fmt)


def _finish(model, device: str, weights: str | None) -> None:
    """Quantize the projections to `weights` (before fusing: quantized weights stay as torchao made them), then fuse
    on the GPU."""
    if weights is not None:
        from kvscope.models.quantize import quantize

        quantize(model, weights, device)
    _fuse_on_gpu(model, device)


def _fuse_on_gpu(model, device: str) -> None:
    """On CUDA, stack each layer's q/k/v and gate/up weights (`_compat.fuse_projections`: same memory, same results)
    so kvscope's decode step runs one matrix product for each; the CPU decodes through the model's forward."""
    if str(device).startswith("cuda"):
        from kvscope import _compat

        _compat.fuse_projections(model)


def _is_broken_file(exc: Exception) -> bool:
    """Errors that reading a damaged weights file raises (safetensors' own, or the OS's)."""
    from safetensors import SafetensorError

    return isinstance(exc, (SafetensorError, OSError, EOFError))


def _warn_if_rebuilt(text: str) -> None:
    if "broken" in text:
        import warnings

        warnings.warn(text, stacklevel=3)


def _config_values(ref: str) -> dict[str, Any]:
    import json

    from kvscope import _compat

    spec_for(ref)  # raises the right error for a bad path or config
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        return _compat.config_from_gguf(str(path)).to_dict()
    return json.loads((path / "config.json" if path.is_dir() else path).read_text())


def _gguf_spec(path: Path) -> ModelSpec:
    if not path.is_file():
        raise usage(f"GGUF file not found: {path}", fix="the MODEL argument")
    from kvscope import _compat
    from kvscope.models.embedded import _require_gguf_reader

    _require_gguf_reader()
    try:
        config = _compat.config_from_gguf(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure becomes one clear message
        raise usage(f"cannot read GGUF metadata of {path}: {exc}", fix="the MODEL argument") from None
    return ModelSpec.from_hf_config(config, name=path.stem, source=str(path))


def _unknown(ref: str):
    return usage(
        f"unknown model {ref!r}: not a catalogue name and no such file or directory",
        expected="a local model directory, a .gguf file, or one of " + ", ".join(catalogue.names()),
        fix="the MODEL argument",
    )
