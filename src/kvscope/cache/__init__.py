"""The budgeted KV cache: `BudgetedCache`, its stores and its statistics."""

from kvscope.cache.budgeted import BudgetedCache
from kvscope.cache.layer import CacheFullError
from kvscope.cache.stats import CacheStats, EvictionEvent, LayerStats

__all__ = ["BudgetedCache", "CacheFullError", "CacheStats", "EvictionEvent", "LayerStats"]
