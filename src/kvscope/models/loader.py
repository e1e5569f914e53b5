"""`load(ref)`: a model, its tokenizer and its `ModelSpec`, from a local directory, a GGUF, the embedded default
or a catalogue shape with random weights."""

from __future__ import annotations

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
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise usage(f"device {device!r} was asked for but CUDA is not available here", expected="cpu",
                    fix="--device")
    return str(device)


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
         attn_implementation: str = "sdpa", seed: int = 0) -> LoadedModel:
    """Load a model for inference.

    `ref` is a local Hugging Face model directory, a `.gguf` file, the embedded default `smollm2-135m`, or a catalogue
    name with `random_weights=True` for shape-only runs (built directly on the device in `dtype`).

    >>> model, tokenizer, spec = load("smollm2-135m")          # doctest: +SKIP
    >>> model, _, spec = load("llama-3-8b", random_weights=True, device="cuda")  # doctest: +SKIP
    """
    from kvscope import _compat

    _compat.quiet_transformers()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if random_weights:
        entry = catalogue.catalogue_entry(ref) if catalogue.is_catalogue_name(ref) else None
        values = entry.config if entry else _config_values(ref)
        model = _compat.build_random_model(values, torch_dtype, dev, attn_implementation, seed)
        spec = ModelSpec.from_hf_config(values, name=entry.name if entry else Path(ref).name,
                                        source=entry.source if entry else str(ref))
        return LoadedModel(model, None, spec)
    if ref.strip().lower() == EMBEDDED_NAME:
        path = ensure_converted()
        return _load_dir(path, torch_dtype, dev, attn_implementation, name=EMBEDDED_NAME)
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
        from kvscope.models.embedded import _require_gguf_reader

        _require_gguf_reader()
        model = _compat.from_pretrained(str(path.parent), torch_dtype, dev, attn_implementation, gguf_file=path.name)
        tokenizer = _compat.tokenizer_from_pretrained(str(path.parent), gguf_file=path.name)
        spec = ModelSpec.from_hf_config(model.config, name=path.stem, source=str(path))
        return LoadedModel(model, tokenizer, spec)
    if path.is_dir():
        return _load_dir(path, torch_dtype, dev, attn_implementation, name=path.name)
    raise _unknown(ref)


def _load_dir(path: Path, torch_dtype, device: str, attn_implementation: str, *, name: str) -> LoadedModel:
    from kvscope import _compat

    spec = ModelSpec.from_config_file(path, name=name)  # validates config.json before touching weights
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.safetensors.index.json"))
    if not weights:
        raise usage(f"no safetensors weights in {path}", expected="model.safetensors or sharded "
                    "model-0000x-of-0000y.safetensors with model.safetensors.index.json",
                    fix="MODEL, or --random-weights for a shape-only run")
    model = _compat.from_pretrained(str(path), torch_dtype, device, attn_implementation)
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        tokenizer = _compat.tokenizer_from_pretrained(str(path))
    return LoadedModel(model, tokenizer, spec)


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
