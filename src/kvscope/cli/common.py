"""Arguments and steps shared by the commands that load a model and run it."""

from __future__ import annotations

from kvscope.cli import output
from kvscope.kvformats import DTYPE_BYTES, KV_FORMATS


def add_model_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="smollm2-135m (embedded), a local model directory, a .gguf file, or a catalogue name with "
                   "--random-weights")
    p.add_argument("--random-weights", action="store_true", help="catalogue shape with random weights")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--dtype", default=None, choices=list(DTYPE_BYTES),
                   help="weights (default bf16 on GPU, fp32 on CPU)")


def add_cache_arguments(p, *, default_policy: str = "lru") -> None:
    # the names are listed here, not imported, so that building the parser never imports torch
    p.add_argument("--policy", default=default_policy, help="eviction policy: full, h2o, knorm, lru, random, "
                   "sliding_window, snapkv, streaming_llm, tova (`kvscope.policies.available()`)")
    p.add_argument("--budget", type=int, default=None, help="KV tokens kept per layer and sequence")
    p.add_argument("--kv-dtype", default=None, choices=list(KV_FORMATS), help="KV storage (default: model dtype)")
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk, tokens (default 512)")


def load_model(args):
    from kvscope.models import load

    with output.status(f"loading {args.model}"):
        return load(args.model, random_weights=args.random_weights, dtype=args.dtype, device=args.device)


def check_policy_args(args) -> None:
    """Validate policy and budget before the (slow) model load, so bad input fails fast."""
    from kvscope.errors import require_positive
    from kvscope.policies import get

    policy = get(args.policy)
    if args.budget is not None:
        require_positive("--budget", args.budget, option="--budget")
        policy.check_budget(args.budget)
    require_positive("--chunk-size", args.chunk_size, option="--chunk-size")


def measured_workload(args):
    """Validate everything a measured run (doctor, fit) needs before loading the model; return its Workload.

    Sets `args.dtype` to the dtype the model will be loaded in (bf16 on CUDA, fp32 on the CPU by default)."""
    from kvscope.models.loader import spec_for
    from kvscope.planner.estimate import check_positions
    from kvscope.planner.sizes import parse_size
    from kvscope.planner.workload import Workload

    check_policy_args(args)
    if args.gpu_memory is not None:
        parse_size(args.gpu_memory)
    args.dtype = args.dtype or ("bf16" if cuda_requested(args.device) else "fp32")
    w = Workload(batch=args.batch, context=args.context, new_tokens=args.new_tokens, dtype=args.dtype,
                 kv_dtype=args.kv_dtype, runtime=args.runtime, budget_tokens=args.budget, chunk_size=args.chunk_size)
    check_positions(spec_for(args.model), w)  # a context beyond the model's positions fails before loading
    return w


def cuda_requested(device: str) -> bool:
    """Whether `--device` resolves to CUDA (auto picks CUDA when there is one)."""
    import torch

    if str(device).startswith("cuda"):
        return True
    return device == "auto" and torch.cuda.is_available()
