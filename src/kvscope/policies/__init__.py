"""Eviction policies for `BudgetedCache`: one per module, listed by `available()`, built by `get(name, **knobs)`."""

from kvscope.policies.base import Observation, Policy, SlotState, select_evictions
from kvscope.policies.registry import available, get, knobs, policy_class, preferred_for

__all__ = ["Observation", "Policy", "SlotState", "available", "get", "knobs", "policy_class", "preferred_for",
           "select_evictions"]
