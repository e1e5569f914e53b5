"""One workload, one number: the predicted peak and whether it fits. Search and advice are built on this."""

from __future__ import annotations

from dataclasses import dataclass

from kvscope.errors import usage
from kvscope.models.spec import ModelSpec
from kvscope.planner import memory
from kvscope.planner.workload import Workload
from kvscope.weightformats import check_format, weight_format


@dataclass(frozen=True)
class Estimate:
    peak: memory.Phase
    phases: tuple[memory.Phase, ...]
    overhead_bytes: int
    capacity_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.peak.total

    @property
    def needed_bytes(self) -> int:
        return self.peak_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.capacity_bytes


def max_prompt(spec: ModelSpec, new_tokens: int) -> int:
    """The longest prompt whose generation stays within the model's positions (prompt + new - 1 positions)."""
    return spec.max_position_embeddings - new_tokens + 1


def check_positions(spec: ModelSpec, w: Workload) -> None:
    """A sequence longer than the model's positions is a usage error that names the RoPE setup."""
    if w.kv_tokens <= spec.max_position_embeddings:
        return
    hint = (
        "Llama 3.1/3.2/3.3 reach 131072 positions through llama3 RoPE scaling; a longer context needs a model "
        "trained with a larger scaling factor"
        if not spec.rope_scaling
        else "the RoPE scaling already in place sets this limit"
    )
    raise usage(
        f"context {w.context} + {w.new_tokens} new tokens need {w.kv_tokens} positions (the last new token is never "
        f"fed back), but {spec.name} supports {spec.max_position_embeddings} ({spec.describe_rope()}); {hint}",
        expected=f"context + new tokens - 1 <= {spec.max_position_embeddings}",
        fix="--context or --new-tokens",
    )


def estimate(spec: ModelSpec, w: Workload, capacity_bytes: int) -> Estimate:
    """Predicted peak of `torch.cuda.max_memory_allocated()` for `w`, and the overhead on top of it."""
    check_positions(spec, w)
    if spec.num_heads % w.tp:
        raise usage(f"tensor-parallel degree {w.tp} does not divide {spec.num_heads} attention heads",
                    expected="a divisor of " + str(spec.num_heads), fix="--tp")
    if w.weights is not None:
        check_format(weight_format(w.weights), w.dtype, spec.linears(), spec.name)
    phases = tuple(memory.phases(spec, w))
    peak = max(phases, key=lambda p: p.total)
    return Estimate(peak, phases, memory.overhead_bytes(list(phases)), capacity_bytes)


def fits(spec: ModelSpec, w: Workload, capacity_bytes: int) -> bool:
    try:
        return estimate(spec, w, capacity_bytes).fits
    except ValueError:
        return False
