import pytest

from kvscope.errors import UsageError
from kvscope.models import catalogue

REQUIRED = ["llama-3-8b", "llama-3-70b", "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "llama-3.2-1b",
            "llama-3.2-3b", "llama-3.3-70b", "smollm2-135m"]


def test_required_entries_present_and_sourced():
    for name in REQUIRED:
        entry = catalogue.catalogue_entry(name)
        assert entry.source.startswith("https://huggingface.co/") and entry.source.endswith("config.json")


@pytest.mark.parametrize("name", [n for n in REQUIRED if n.startswith("llama")])
def test_llama3_vocab_and_theta(name):
    cfg = catalogue.from_name(name)
    assert cfg["vocab_size"] == 128256 and cfg["rope_theta"] == 500000.0


@pytest.mark.parametrize("name, factor, tied", [
    ("llama-3-8b", None, False), ("llama-3-70b", None, False), ("llama-3.1-8b", 8.0, False),
    ("llama-3.1-70b", 8.0, False), ("llama-3.1-405b", 8.0, False), ("llama-3.3-70b", 8.0, False),
    ("llama-3.2-1b", 32.0, True), ("llama-3.2-3b", 32.0, True),
])
def test_rope_scaling_and_tying(name, factor, tied):
    cfg = catalogue.from_name(name)
    scaling = cfg.get("rope_scaling")
    assert (scaling or {}).get("factor") == factor
    if scaling:
        assert scaling["rope_type"] == "llama3" and scaling["original_max_position_embeddings"] == 8192
    assert cfg["tie_word_embeddings"] is tied


def test_exact_shapes():
    c = catalogue.from_name("llama-3.1-405b")
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
            c["num_key_value_heads"]) == (126, 16384, 53248, 128, 8)
    c = catalogue.from_name("llama-3.2-1b")
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["head_dim"]) == (16, 2048, 8192, 64)
    c = catalogue.from_name("smollm2-135m")
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
            c["vocab_size"], c["rope_theta"]) == (30, 576, 9, 3, 49152, 100000.0)


def test_from_name_overrides():
    assert catalogue.from_name("llama-3-8b", num_hidden_layers=2)["num_hidden_layers"] == 2
    assert catalogue.from_name("llama-3-8b")["num_hidden_layers"] == 32


def test_unknown_name_lists_known_ones():
    with pytest.raises(UsageError, match="llama-3.1-405b"):
        catalogue.catalogue_entry("llama-4-8b")
