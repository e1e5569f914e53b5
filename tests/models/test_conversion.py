"""GGUF conversions are cached by content, verified against what was written, rebuilt when broken, and leave no
stale temporary directories; a damaged weights file is the user's error, named as such."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import pytest

from kvscope.errors import UsageError
from kvscope.models import embedded
from tests.cli.test_cli import run
from tests.conftest import build_tiny


class _Tokenizer:
    def save_pretrained(self, directory: str) -> None:
        Path(directory, "tokenizer_config.json").write_text("{}")


@pytest.fixture
def converter(monkeypatch, tmp_path):
    """A cache in tmp_path and a 'GGUF' whose dequantized model is the tiny Llama (no 30 s conversion)."""
    from kvscope import _compat

    monkeypatch.setenv("KVSCOPE_CACHE", str(tmp_path / "cache"))
    calls = []

    def from_pretrained(path, dtype, device, attn="sdpa", gguf_file=None):
        calls.append(gguf_file)
        return build_tiny()

    monkeypatch.setattr(_compat, "from_pretrained", from_pretrained)
    monkeypatch.setattr(_compat, "tokenizer_from_pretrained", lambda path, gguf_file=None: _Tokenizer())
    src = tmp_path / "user" / "tiny.gguf"
    src.parent.mkdir()
    src.write_bytes(b"GGUF" + os.urandom(4096))
    return src, calls


def test_converted_once_then_reused_and_keyed_by_content(converter, tmp_path):
    src, calls = converter
    notices = []
    first = embedded.ensure_converted(src, on_notice=notices.append)
    assert embedded.verify(first) is None and len(calls) == 1 and "dequantizing tiny.gguf" in notices[0]
    again = embedded.ensure_converted(src, on_notice=notices.append)
    assert again == first and len(calls) == 1 and len(notices) == 1  # no second conversion, no notice
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copy(src, copy)
    assert embedded.ensure_converted(copy) == first and len(calls) == 1  # same bytes, same conversion
    src.write_bytes(src.read_bytes() + b"x")  # other bytes: another conversion
    assert embedded.ensure_converted(src) != first and len(calls) == 2


@pytest.mark.parametrize("damage", ["truncate", "same-size", "delete", "no-manifest"])
def test_a_broken_conversion_is_rebuilt_and_said(converter, damage):
    src, calls = converter
    target = embedded.ensure_converted(src)
    weights = target / "model.safetensors"
    if damage == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
    elif damage == "same-size":
        data = bytearray(weights.read_bytes())
        data[-10:] = b"0123456789"
        weights.write_bytes(bytes(data))  # same size, new mtime: the hash tells
    elif damage == "delete":
        weights.unlink()
    else:
        (target / embedded.MANIFEST).unlink()
    notices = []
    assert embedded.ensure_converted(src, on_notice=notices.append) == target
    assert len(calls) == 2 and "is broken" in notices[0] and "dequantizing" in notices[0]
    assert embedded.verify(target) is None


def test_stale_temporary_directories_are_removed(converter):
    src, _ = converter
    models = embedded.ensure_converted(src).parent
    stale = models / ".convert-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    busy = models / ".convert-busy"
    busy.mkdir()
    fd = os.open(models / ".convert-busy.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a conversion still running (its own open file holds the lock)
    try:
        embedded.ensure_converted(src)
        assert not stale.exists() and busy.exists()
    finally:
        os.close(fd)
    embedded.ensure_converted(src)
    assert not busy.exists()


def test_a_truncated_safetensors_file_is_a_usage_error(capsys, tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    code, _, err = run(capsys, "run", str(tiny_model_dir), "--context", "8", "--device", "cpu")
    assert code == 2 and f"cannot read the weights in {tiny_model_dir}" in err and "internal error" not in err
    from kvscope.models import load

    with pytest.raises(UsageError, match="truncated or partly downloaded"):
        load(str(tiny_model_dir), device="cpu")


@pytest.mark.parametrize("cut, commands", [(1000, ("plan", "run", "doctor")), (80_000_000, ("run",))])
def test_a_truncated_gguf_is_exit_2_in_every_command(capsys, tmp_path, cut, commands):
    """Cut in its header, or in its tensors (run used to fail with exit 1 there, plan with 2)."""
    broken = tmp_path / "broken.gguf"
    with open(embedded.gguf_path(), "rb") as f:
        broken.write_bytes(f.read(cut))
    argvs = {"plan": ["plan", str(broken)], "run": ["run", str(broken), "--prompt", "hi", "--device", "cpu"],
             "doctor": ["doctor", str(broken), "--batch", "1", "--context", "8", "--new-tokens", "2", "--device",
                        "cpu", "--out", str(tmp_path / "r")]}
    for name in commands:
        code, _, err = run(capsys, *argvs[name])
        assert code == 2 and "cannot read GGUF metadata" in err, (name, err)


@pytest.mark.slow
def test_a_user_gguf_with_the_embedded_bytes_reuses_its_conversion(smollm, tmp_path):
    """Keyed by content: a copy of the embedded GGUF under another name loads from the cached conversion."""
    copy = tmp_path / "my-model.gguf"
    shutil.copy(embedded.gguf_path(), copy)
    assert embedded.converted_dir(copy) == embedded.converted_dir()
    notices = []
    from kvscope.models import load

    _, tokenizer, spec = load(str(copy), device="cpu", on_notice=notices.append)
    assert notices == [] and spec.name == "my-model" and spec.num_layers == 30 and tokenizer is not None
