"""Models: load(ref) -> (model, tokenizer, ModelSpec), and the catalogue of Llama 3 family shapes."""

from kvscope.models.catalogue import CATALOGUE, from_name
from kvscope.models.loader import LoadedModel, load, spec_for
from kvscope.models.spec import ModelSpec

__all__ = ["CATALOGUE", "LoadedModel", "ModelSpec", "from_name", "load", "spec_for"]
