"""Arguments and steps shared by the commands: one name, one meaning and one check per option across commands."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from kvscope.cli import output
from kvscope.kvformats import DTYPE_BYTES, KV_FORMATS
from kvscope.planner.workload import DEFAULT_CHUNK
from kvscope.weightformats import INT4_WEIGHT_GROUP, WEIGHT_FORMATS

# the names are listed here, not imported, so that building the parser never imports torch
POLICIES = "full, h2o, knorm, lru, random, sliding_window, snapkv, streaming_llm, tova"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")
# options that configure kvscope's own cache: plain transformers generate() has no use for them
KVSCOPE_CACHE_OPTIONS = (("--policy", "policy"), ("--budget", "budget"), ("--chunk-size", "chunk_size"),
                         ("--policy-knob", "policy_knob"), ("--recall", "recall"))


def device_name(text: str) -> str:
    """argparse type of `--device`: auto, cpu, cuda or cuda:N (checked against this machine before any loading)."""
    if not _DEVICE.match(text.strip().lower()):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (expected auto, cpu, cuda or cuda:N)")
    return text.strip().lower()


def knob(text: str) -> tuple[str, object]:
    """argparse type of `--policy-knob NAME=VALUE`; VALUE becomes an int, a float, a bool or stays text."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. window=64), got {text!r}")
    value = value.strip()
    for convert in (int, float):
        try:
            return name.strip(), convert(value)
        except ValueError:
            pass
    return name.strip(), {"true": True, "false": False}.get(value.lower(), value)


def parents(names: tuple[str, ...]) -> list[argparse.ArgumentParser]:
    """The option groups a command takes (its module's PARENTS), as argparse parent parsers: each option is defined
    here once, with one name, one meaning and one check, whatever command takes it."""
    out = []
    for name in names:
        parent = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        _PARENTS[name](parent)
        out.append(parent)
    return out


def _model(p) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="smollm2-135m (embedded), a local model directory, a .gguf file, or a catalogue name with "
                   "--random-weights")
    p.add_argument("--random-weights", action="store_true",
                   help="catalogue shape with random weights (no tokenizer: give the prompt as --context N)")
    p.add_argument("--device", type=device_name, default="auto", metavar="DEVICE",
                   help="auto (default: CUDA when there is one), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=list(DTYPE_BYTES),
                   help="weights and activations (default bf16 on CUDA, fp32 on the CPU)")
    add_weights_argument(p)


def add_weights_argument(p) -> None:
    """`--weights`: the format of the decoder layers' projections (torchao), for every command that loads or plans."""
    p.add_argument("--weights", default=None, choices=list(WEIGHT_FORMATS),
                   help="quantize the linear layers' weights at load time (torchao: int8 or fp8 weight-only per row, "
                   f"int4 in groups of {INT4_WEIGHT_GROUP} on CUDA); frees weight memory, not KV (default: the "
                   "model dtype)")


def _cache(p) -> None:
    p.add_argument("--policy", default=None, help=f"eviction policy of kvscope's cache: {POLICIES} "
                   "(`kvscope.policies.available()`; default full, lru for `kvscope run`)")
    p.add_argument("--policy-knob", type=knob, action="append", default=None, metavar="NAME=VALUE",
                   help="a knob of the policy, e.g. window=64 for snapkv (repeatable; see kvscope.policies.knobs)")
    p.add_argument("--budget", type=int, default=None, help="KV tokens kept per layer and sequence (kvscope's cache)")
    p.add_argument("--kv-dtype", default=None, choices=list(KV_FORMATS),
                   help="KV storage of kvscope's cache (default: the model dtype)")
    p.add_argument("--chunk-size", type=int, default=None, help=f"prefill chunk, tokens (default {DEFAULT_CHUNK})")
    p.add_argument("--recall", choices=("cpu",), default=None,
                   help="keep what a chunked prefill evicts in CPU memory and bring back what the prompt's last chunk "
                   "(the question) needs (attention-reading policies; kvscope's runtime)")
    p.set_defaults(_default_policy="full")


def _runtime(p) -> None:
    from kvscope.planner.workload import RUNTIMES

    p.add_argument("--runtime", choices=RUNTIMES, default="hf", help="hf: plain transformers generate() with its "
                   "default cache (default); kvscope: chunked prefill into kvscope's preallocated BudgetedCache")


def _prompt(p, required: bool) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--prompt", help="prompt text (needs a model with a tokenizer)")
    src.add_argument("--prompt-file", metavar="FILE", help="file holding the prompt (UTF-8 text)")
    src.add_argument("--context", type=int, metavar="N", help="N random token ids as the prompt (no tokenizer needed)")


def _emulate(p) -> None:
    p.add_argument("--gpu-memory", metavar="SIZE", help="emulate a GPU of this size with its unit (e.g. 24GiB) on a "
                   "larger one")


def _tp(p) -> None:
    p.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel degree: the model split over N GPUs "
                   "with transformers' tensor-parallel plan (one rank per GPU, torch.distributed + NCCL); memory is "
                   "per GPU (default 1)")


_PARENTS = {"tp": _tp, "model": _model, "cache": _cache, "runtime": _runtime, "prompt": lambda p: _prompt(p, True),
            "prompt-optional": lambda p: _prompt(p, False), "emulate": _emulate}


def add_new_tokens(p, default: int, help_text: str = "tokens to generate") -> None:
    p.add_argument("--new-tokens", type=int, default=default, help=f"{help_text} (default {default})")


def add_out_arguments(p, *, default: str | None, what: str) -> None:
    kw = {"default": default} if default else {"required": True}
    p.add_argument("--out", metavar="DIR", help=f"output directory for {what}; must be empty or new unless --force"
                   + (f" (default {default})" if default else ""), **kw)
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out, replacing the files of an earlier kvscope run there")


def policy_name(args) -> str:
    return args.policy or args._default_policy


def chunk_size(args) -> int:
    return args.chunk_size if args.chunk_size is not None else DEFAULT_CHUNK


def knobs(args) -> dict[str, object]:
    """`--policy-knob` pairs as keyword arguments; a knob given twice is a usage error."""
    from kvscope.errors import usage

    out: dict[str, object] = {}
    for name, value in args.policy_knob or []:
        if name in out:
            raise usage(f"--policy-knob {name} was given twice ({out[name]!r} and {value!r})", fix="--policy-knob")
        out[name] = value
    return out


def check_runtime_options(args, *, kv_dtype: bool = False) -> None:
    """Under `--runtime hf` (plain transformers generate()), options of kvscope's cache would be dropped silently.
    `kv_dtype`: refuse --kv-dtype too (commands without a Workload, whose own check explains it better)."""
    from kvscope.errors import usage

    if getattr(args, "runtime", "kvscope") != "hf":
        return
    options = KVSCOPE_CACHE_OPTIONS + ((("--kv-dtype", "kv_dtype"),) if kv_dtype else ())
    given = [flag for flag, dest in options if getattr(args, dest, None) is not None]
    if given:
        verb = "configures" if len(given) == 1 else "configure"
        raise usage(f"{', '.join(given)} {verb} kvscope's cache, but --runtime is hf (plain transformers generate() "
                    "with its own cache), which would ignore it", expected="--runtime kvscope with these options",
                    fix=f"--runtime kvscope, or drop {', '.join(given)}")


def check_policy_args(args, *, kv_dtype: bool = False) -> None:
    """Validate the runtime, policy, knobs, budget and chunk before the (slow) model load, so bad input fails fast."""
    from kvscope.errors import UsageError, require_positive, usage
    from kvscope.policies import get

    check_runtime_options(args, kv_dtype=kv_dtype)
    try:
        policy = get(policy_name(args), **knobs(args))
    except UsageError as exc:
        if not args.policy_knob:
            raise
        raise usage(f"{exc.cli_text} (knobs are set with --policy-knob NAME=VALUE)") from None
    if args.budget is not None:
        require_positive("--budget", args.budget, option="--budget")
        policy.check_budget(args.budget)
    if args.chunk_size is not None:
        require_positive("--chunk-size", args.chunk_size, option="--chunk-size")
    if getattr(args, "recall", None) is not None:  # before the model loads: a policy that cannot recall fails here
        from kvscope.cache.recall import check_recall

        check_recall(policy, False, args.recall)


def check_device(args) -> str:
    """The device `--device` resolves to on this machine; a usage error before anything loads if it is not here."""
    from kvscope.models.loader import resolve_device

    return resolve_device(args.device)


def measured_workload(args):
    """Validate everything a measured run (doctor, fit) needs before loading the model; return its Workload.

    Sets `args.dtype` to the dtype the model will be loaded in (bf16 on CUDA, fp32 on the CPU by default)."""
    from kvscope.errors import require_positive
    from kvscope.models.loader import spec_for
    from kvscope.planner.estimate import check_positions
    from kvscope.planner.sizes import parse_size
    from kvscope.planner.workload import Workload

    for option, value in (("--batch", args.batch), ("--context", args.context), ("--new-tokens", args.new_tokens)):
        require_positive(option, value, option=option)
    check_policy_args(args)
    gpu_memory = parse_size(args.gpu_memory) if args.gpu_memory is not None else None
    device = check_device(args)
    args.dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    kvscope = args.runtime == "kvscope"
    w = Workload(batch=args.batch, context=args.context, new_tokens=args.new_tokens, dtype=args.dtype,
                 kv_dtype=args.kv_dtype, weights=args.weights, runtime=args.runtime, budget_tokens=args.budget,
                 chunk_size=chunk_size(args),
                 policy=policy_name(args) if kvscope else None, knobs=knobs(args) if kvscope else {},
                 gpu_memory=gpu_memory, recall=getattr(args, "recall", None))
    spec = spec_for(args.model)
    check_positions(spec, w)  # a context beyond the model's positions fails before loading
    check_weights(spec, w.weights, w.dtype, device)
    check_kv_dtype(spec, w.kv_dtype)
    return w


def check_kv_dtype(spec, kv_dtype: str | None) -> None:
    from kvscope.errors import usage
    from kvscope.kvformats import INT4_GROUP

    if kv_dtype and not spec.supports_kv_dtype(kv_dtype):
        raise usage(f"--kv-dtype {kv_dtype} cannot store {spec.name}'s KV: int4 packs channels in groups of "
                    f"{INT4_GROUP} and its head_dim is {spec.head_dim}",
                    expected=f"a head_dim that is a multiple of {INT4_GROUP} for int4", fix="--kv-dtype int8 or fp8")


def check_weights(spec, weights: str | None, dtype: str, device: str) -> None:
    """`--weights` that cannot hold this model, or cannot run on this device, fails before the model loads."""
    if weights is None:
        return
    from kvscope.models.quantize import check_runnable
    from kvscope.weightformats import check_format, weight_format

    check_runnable(weight_format(weights).name, device)
    check_format(weight_format(weights), dtype, spec.linears(), spec.name)


def load_model(args):
    from kvscope.models import load

    def notice(text: str) -> None:
        output.stderr.print(f"note: {text}", markup=False, highlight=False)

    with output.status(f"loading {args.model}"):
        return load(args.model, random_weights=args.random_weights, dtype=args.dtype, device=args.device,
                    weights=args.weights, on_notice=notice)


def prompt_text(args) -> str | None:
    """The prompt text of `--prompt` or `--prompt-file` (None for `--context`); empty or unreadable input is a usage
    error naming the option and the file."""
    from kvscope.errors import usage

    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file is not None:
        text = _read_prompt_file(args.prompt_file)
    else:
        return None
    if not text.strip():
        where = f"the prompt file {args.prompt_file}" if args.prompt_file is not None else "--prompt"
        raise usage(f"the prompt is empty ({where} holds no text)", expected="some text, or --context N for N random "
                    "tokens", fix="--prompt" if args.prompt is not None else "--prompt-file")
    return text


def _read_prompt_file(name: str) -> str:
    from kvscope.errors import usage

    path = Path(name).expanduser()
    if not path.exists():
        raise usage(f"prompt file not found: {path}", expected="a UTF-8 text file", fix="--prompt-file")
    if path.is_dir():
        raise usage(f"the prompt file {path} is a directory", expected="a UTF-8 text file", fix="--prompt-file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise usage(f"the prompt file {path} is not UTF-8 text", expected="a UTF-8 text file",
                    fix="--prompt-file") from None
    except OSError as exc:
        raise usage(f"cannot read the prompt file {path}: {exc.strerror or exc}", fix="--prompt-file") from None


def out_dir_state(path: str) -> bool:
    """Whether `path` existed before this command (a command that made it may remove it again if it stays empty)."""
    return Path(path).expanduser().exists()
