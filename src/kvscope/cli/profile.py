"""Profile one generation with torch.profiler: ranges per decoder layer and per phase (prefill, decode), memory and
shapes recorded, NVTX ranges for Nsight Systems with --nvtx. Writes DIR/trace.json (open in https://ui.perfetto.dev or
chrome://tracing) and DIR/tensorboard/ (`tensorboard --logdir DIR/tensorboard` with torch-tb-profiler installed), and
prints the top operators by time and by memory, the time per decoder layer, and prefill vs decode."""

from __future__ import annotations

import os
from pathlib import Path

from kvscope.cli import common, output
from kvscope.errors import require_positive, usage

HELP = "torch.profiler trace of a generation: per-layer and per-phase times, top operators, memory"
PARENTS = ("model", "prompt-optional", "runtime", "cache")
DEFAULT_CONTEXT = 128  # random prompt tokens when no prompt is given


def add_arguments(p) -> None:
    import argparse

    p.add_argument("--batch", type=int, default=1, help="sequences per batch, each with the same prompt (default 1)")
    common.add_new_tokens(p, 16, "tokens to generate; end-of-sequence does not stop early")
    p.add_argument("--nvtx", action="store_true", help="also emit NVTX ranges, for `nsys profile -t cuda,nvtx` "
                   "(CUDA only)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="run the workload briefly before profiling, so one-time start-up costs stay out (default on)")
    p.add_argument("--top", type=int, default=15, help="operators in each top list (default 15)")
    common.add_out_arguments(p, default=None, what="trace.json and tensorboard/")
    output.add_format(p)


def run(args) -> int:
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keeps kineto's start/stop lines off stderr (read when torch loads)
    _check_numbers(args)
    common.check_policy_args(args, kv_dtype=True)  # no Workload here to refuse a KV dtype plain generate() ignores
    text = common.prompt_text(args)
    from kvscope.models.loader import load, resolve_device
    from kvscope.report.write import check_out_dir
    from kvscope.runtime.session import check_positions

    check_out_dir(args.out, force=args.force)  # a profile never lands among the files of another run
    device = resolve_device(args.device)
    if args.nvtx and not device.startswith("cuda"):
        raise usage("--nvtx marks ranges for Nsight Systems, which traces CUDA work, but this run is on the CPU"
                    + ("" if args.device != "auto" else " (CUDA is not available here)"), expected="--device cuda on "
                    "a machine with a CUDA GPU", fix="--device cuda, or drop --nvtx")
    if text is not None and args.random_weights:
        raise _no_tokenizer(args)
    with output.status(f"loading {args.model}"):
        model, tokenizer, spec = load(args.model, random_weights=args.random_weights, dtype=args.dtype, device=device,
                                      weights=args.weights,
                                      on_notice=lambda text: output.stderr.print(f"note: {text}", markup=False))
    ids = _input_ids(args, text, tokenizer, spec)
    check_positions(ids.shape[1], args.new_tokens, spec.max_position_embeddings)
    created = not Path(args.out).expanduser().exists()
    try:
        result = _profile(args, model, ids, spec)
    except BaseException:  # Ctrl-C or a failure: a directory this run made and left empty goes away again
        _remove_if_empty(Path(args.out).expanduser(), created)
        raise
    if args.force:
        _drop_older_traces(Path(result.tensorboard_dir), Path(result.tensorboard_file))
    output.emit(result.to_dict(), args.format, render)
    return 0


def _drop_older_traces(tb_dir: Path, keep: Path) -> None:
    """With --force the new profile replaces the old one whole: TensorBoard traces of earlier runs go (only once the
    new one is written, so a failed run loses nothing)."""
    for f in tb_dir.rglob("*.pt.trace.json"):
        if f.resolve() != keep.resolve():
            f.unlink()
    for d in sorted((d for d in tb_dir.rglob("*") if d.is_dir()), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()


def _remove_if_empty(out: Path, created: bool) -> None:
    import shutil

    if not created or not out.is_dir():
        return
    tb = out / "tensorboard"
    if tb.is_dir() and not any(p.is_file() for p in tb.rglob("*")):
        shutil.rmtree(tb, ignore_errors=True)
    if not any(out.iterdir()):
        out.rmdir()


def _check_numbers(args) -> None:
    for name, value, option in (("batch", args.batch, "--batch"), ("new tokens", args.new_tokens, "--new-tokens"),
                                ("top", args.top, "--top")):
        require_positive(name, value, option=option)
    for name, value, option in (("context", args.context, "--context"), ("budget", args.budget, "--budget"),
                                ("chunk size", args.chunk_size, "--chunk-size")):
        if value is not None:
            require_positive(name, value, option=option)


def _no_tokenizer(args):
    option = "--prompt-file" if args.prompt_file is not None else "--prompt"
    return usage(f"{args.model} has no tokenizer here (random weights, or none in its directory), so a text prompt "
                 "cannot be encoded", expected="--context N for N random token ids", fix=f"{option} to --context N")


def _input_ids(args, text: str | None, tokenizer, spec):
    from kvscope.runtime.session import random_ids

    if text is not None:
        if tokenizer is None:
            raise _no_tokenizer(args)
        ids = tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            raise usage("the prompt is empty after tokenization", expected="text that encodes to at least one token",
                        fix="--prompt or --prompt-file")
        return ids.expand(args.batch, -1).contiguous()
    return random_ids(spec.vocab_size, args.context if args.context is not None else DEFAULT_CONTEXT, args.batch)


def _cache_factory(args, model, ids):
    """A fresh cache per call (warm-up and profile each get one); its budget is clamped to the sequence and its bytes
    checked against the device before anything is allocated."""
    if args.runtime == "hf":
        return lambda: None
    from kvscope.cache.budgeted import BudgetedCache
    from kvscope.runtime.session import cache_budget, check_cache_fits

    budget, note = cache_budget(args.budget, ids.shape[1] + args.new_tokens - 1)
    if note and args.budget is not None:
        output.stderr.print(f"note: {note}", markup=False, highlight=False)
    chunk = common.chunk_size(args)
    check_cache_fits(model, batch=ids.shape[0], prompt_tokens=ids.shape[1], new_tokens=args.new_tokens,
                     budget_tokens=budget, kv_dtype=args.kv_dtype, chunk_size=chunk)
    return lambda: BudgetedCache(model, common.policy_name(args), budget_tokens=budget, kv_dtype=args.kv_dtype,
                                 chunk_size=chunk, recall=args.recall, **common.knobs(args))


def _run_name(args, spec, ids) -> str:
    parts = [spec.name, args.runtime]
    if args.runtime == "kvscope":
        parts += [common.policy_name(args), str(min(args.budget or ids.shape[1] + args.new_tokens - 1,
                                                    ids.shape[1] + args.new_tokens - 1))]
        parts += [args.kv_dtype] if args.kv_dtype else []
    return "_".join(parts)


def _profile(args, model, ids, spec):
    from kvscope.profile import profile_workload, warm_up

    make_cache = _cache_factory(args, model, ids)
    if args.warmup:
        with output.status("warming up"):
            warm_up(model, ids, make_cache(), chunk_size=common.chunk_size(args))
    cache = make_cache()
    with output.progress() as bar:
        task = bar.add_task("prefill", total=ids.shape[1])

        def on_phase(phase: str, done: int, total: int) -> None:
            bar.update(task, description=phase, completed=done, total=total)

        return profile_workload(model, ids, cache, max_new_tokens=args.new_tokens, chunk_size=common.chunk_size(args),
                                out_dir=args.out, nvtx=args.nvtx, top=args.top, on_phase=on_phase,
                                run_name=_run_name(args, spec, ids))


def render(d: dict) -> None:
    phases = d["phases"]
    steps = d["new_tokens"] - 1
    per_token = f"{1000 * phases['decode_seconds'] / steps:.2f} ms/token" if steps > 0 else "-"
    title = (f"profile: runtime {d['runtime']} on {d['device']}, batch {d['batch']} x {d['prompt_tokens']} prompt + "
             f"{d['new_tokens']} new, {d['num_layers']} layers")
    rows = [
        ("prefill", f"{phases['prefill_seconds']:.4f} s"),
        ("decode", f"{phases['decode_seconds']:.4f} s  ({per_token}, profiler overhead included)"),
        ("wall (profiled)", f"{d['wall_seconds']:.4f} s"),
        ("Chrome trace", d["trace"]),
        ("TensorBoard", f"tensorboard --logdir {d['tensorboard_dir']}  (needs torch-tb-profiler)"),
    ]
    if d["nvtx"]:
        rows.append(("NVTX", "ranges kvscope/prefill, kvscope/decode, kvscope/layer_<i>: run under "
                             "`nsys profile -t cuda,nvtx`"))
    output.stdout.print(output.kv_table(title, rows))
    output.stdout.print(_layer_table(d))
    output.stdout.print(_ops_table("Top operators by self time", d["top_ops_time"], d))
    output.stdout.print(_ops_table("Top operators by self memory (allocated and not freed by the operator itself)",
                                   d["top_ops_memory"], d))


def _layer_table(d: dict):
    from rich.table import Table

    device = d["layers"] and d["layers"][0].get("device_ms") is not None
    t = Table(title="Time per decoder layer (range kvscope/layer_<i>)", title_justify="left")
    cols = ["layer", "calls", "total ms", "prefill ms", "decode ms", "self ms"] + (["device ms"] if device else [])
    for col in cols:
        t.add_column(col, justify="right")
    for r in d["layers"]:
        cells = [r["layer"], r["calls"], r["total_ms"], r["prefill_ms"], r["decode_ms"], r["self_ms"]]
        cells += [r["device_ms"]] if device else []
        t.add_row(*(str(c) for c in cells))
    return t


def _ops_table(title: str, rows: list[dict], d: dict):
    from rich.table import Table

    device = d["device"].startswith("cuda")
    t = Table(title=title, title_justify="left")
    cols = ["operator", "calls", "self CPU ms", "CPU total ms", "self CPU mem"]
    cols += ["self device ms", "device total ms", "self device mem"] if device else []
    t.add_column(cols[0], overflow="fold")
    for col in cols[1:]:
        t.add_column(col, justify="right")
    for r in rows:
        cells = [r["name"], str(r["calls"]), str(r["self_cpu_ms"]), str(r["cpu_total_ms"]),
                 _signed_bytes(r["self_cpu_memory_bytes"])]
        if device:
            cells += [str(r["self_device_ms"]), str(r["device_total_ms"]), _signed_bytes(r["self_device_memory_bytes"])]
        t.add_row(*cells)
    return t


def _signed_bytes(n: int) -> str:
    return ("-" if n < 0 else "") + output.gib(abs(n))
