"""Generate from a prompt under a budgeted KV cache and show what the cache held and dropped, per layer."""

from __future__ import annotations

from kvscope.cli import commands, common, output

HELP = "generate under a budgeted KV cache; print the text and a per-layer KV table"
PARENTS = ("model", "prompt", "cache", "tp")


def add_arguments(p) -> None:
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=True,
                      help="apply the chat template (default)")
    chat.add_argument("--raw", dest="chat", action="store_false", help="feed the text as is")
    p.set_defaults(_default_policy="lru")
    common.add_new_tokens(p, 64, "tokens to generate at most (end-of-sequence stops earlier)")
    output.add_format(p)


def run(args) -> int:
    from kvscope.errors import require_positive

    text = common.prompt_text(args)
    common.check_policy_args(args)
    require_positive("--new-tokens", args.new_tokens, option="--new-tokens")
    if args.context is not None:
        require_positive("--context", args.context, option="--context")
    device = common.check_device(args)
    _check_before_loading(args, text)
    backend = _check_tp(args, device)
    if backend is not None:
        payload = _generate_tensor_parallel(args, text, backend)
        output.emit(payload, args.format, render)
        return 0
    loaded = common.load_model(args)
    result = _generate(args, loaded, text)
    payload = {"model": loaded.spec.name, **result.to_dict()}
    output.emit(payload, args.format, render)
    return 0


def _check_before_loading(args, text: str | None) -> None:
    """What can be known from the config alone fails before a (possibly long) model load."""
    from kvscope.errors import usage
    from kvscope.models.loader import spec_for
    from kvscope.runtime.session import check_positions

    if text is not None and args.random_weights:
        option = "--prompt-file" if args.prompt_file is not None else "--prompt"
        raise usage(f"{args.model} with --random-weights has no tokenizer, so a text prompt cannot be encoded",
                    expected="--context N for N random token ids", fix=f"drop {option} and add --context N")
    if args.context is not None:
        check_positions(args.context, args.new_tokens, spec_for(args.model).max_position_embeddings)


def _check_tp(args, device: str) -> str | None:
    from kvscope.distributed import check_tp
    from kvscope.models.loader import spec_for

    return check_tp(args.tp, spec_for(args.model) if args.tp != 1 else None, device)


def _generate_tensor_parallel(args, text: str | None, backend: str) -> dict:
    """`--tp N`: every rank runs the prompt on its shard of the model and of the KV heads; rank 0's text and table,
    each rank's figures and the total."""
    from kvscope.distributed import launch, merge_ranks
    from kvscope.distributed.ranks import run_job
    from kvscope.models.loader import spec_for
    from kvscope.runtime.session import random_ids

    spec = spec_for(args.model)
    ids = None if text is not None else random_ids(spec.vocab_size, args.context)
    job = {"model": args.model, "random_weights": args.random_weights, "dtype": args.dtype, "text": text, "ids": ids,
           "chat": args.chat, "policy": common.policy_name(args), "knobs": common.knobs(args), "budget": args.budget,
           "kv_dtype": args.kv_dtype, "new_tokens": args.new_tokens, "chunk_size": common.chunk_size(args),
           "recall": args.recall}
    with output.status(f"running {args.model} on {args.tp} ranks ({backend})"):
        results = launch(run_job, job, args.tp, backend=backend)
    return {"model": results[0]["spec"], **results[0]["result"], "tensor_parallel": {"tp": args.tp,
            "backend": backend, **merge_ranks(results)}}


def _generate(args, loaded, text: str | None):
    import torch

    from kvscope.errors import does_not_fit
    from kvscope.runtime.session import random_ids, run_prompt

    ids = None if text is not None else random_ids(loaded.spec.vocab_size, args.context)
    with output.progress() as bar:
        task = bar.add_task("generating", total=None)

        def on_phase(phase, done, total):
            bar.update(task, description=phase, completed=done, total=total)

        try:
            return run_prompt(loaded.model, loaded.tokenizer, text, ids=ids, chat=args.chat,
                              policy=common.policy_name(args), knobs=common.knobs(args), budget_tokens=args.budget,
                              kv_dtype=args.kv_dtype, new_tokens=args.new_tokens,
                              chunk_size=common.chunk_size(args), on_phase=on_phase, recall=args.recall)
        except torch.OutOfMemoryError:
            raise does_not_fit("the generation ran out of GPU memory", fix="--budget or --kv-dtype; the doctor "
                               "explains it: " + _doctor_command(args)) from None


def _doctor_command(args) -> str:
    from kvscope.cli.main import command_parser

    d = command_parser("doctor").parse_args([args.model, "--batch", "1", "--context", str(args.context or 1),
                                             "--new-tokens", str(args.new_tokens)])
    for dest in ("random_weights", "device", "dtype", "weights", "policy", "policy_knob", "budget", "kv_dtype",
                 "chunk_size"):
        setattr(d, dest, getattr(args, dest))
    d.runtime, d.policy = "kvscope", common.policy_name(args)
    return commands.render("doctor", d)


def render(d: dict) -> None:
    from rich.table import Table

    out = output.stdout
    out.print(d["text"], markup=False, highlight=False)
    t = Table(title=f"KV cache per layer: policy {d['policy']}, budget {d['budget_tokens']} tokens per sequence, "
              f"{d['kv_dtype']}", title_justify="left")
    for col in ("layer", "stored tokens", "evicted tokens", "bytes"):
        t.add_column(col, justify="right")
    for row in d["layers"]:
        t.add_row(str(row["layer"]), str(row["stored_tokens"]), str(row["evicted_tokens"]), output.gib(row["bytes"]))
    out.print(t)
    tps = d["decode_tokens_per_second"]
    rows = [("prompt tokens", d["prompt_tokens"]), ("new tokens", d["new_tokens"]),
            ("evicted tokens (all layers)", d["evicted_tokens_total"]),
            ("KV bytes (all layers)", output.gib(d["kv_bytes_total"])),
            ("prefill", f"{d['prefill_seconds']:.3f} s"),
            ("decode", f"{d['decode_seconds']:.3f} s" + (f" ({tps:.1f} tokens/s)" if tps else ""))]
    if d.get("recall"):
        rows.append(("recalled at the prompt's end (tokens per row, at most)", d["recalled_tokens"]))
    if d.get("budget_note"):
        rows.append(("note", d["budget_note"]))
    out.print(output.kv_table("totals", rows))
    if d.get("tensor_parallel"):
        _render_ranks(d["tensor_parallel"])


def _render_ranks(tp: dict) -> None:
    from rich.table import Table

    t = Table(title=f"tensor parallel: {tp['tp']} ranks ({tp['backend']}); the tables above are rank 0's, KV bytes "
              "are per rank", title_justify="left")
    for col in ("rank", "device", "KV heads", "KV bytes", "evicted tokens", "weights", "peak"):
        t.add_column(col, justify="right")
    for r in tp["ranks"]:
        peak = output.gib(r["peak_bytes"]) if r["peak_bytes"] is not None else "-"
        t.add_row(str(r["rank"]), r["device"], str(r["kv_heads"]), output.gib(r["kv_bytes"]), str(r["evicted_tokens"]),
                  output.gib(r["weights_bytes"]), peak)
    total = tp["total"]
    peak = output.gib(total["peak_bytes"]) if total["peak_bytes"] is not None else "-"
    t.add_row("total", "", str(total["kv_heads"]), output.gib(total["kv_bytes"]), "",
              output.gib(total["weights_bytes"]), peak)
    output.stdout.print(t)
    if not tp["agree"]:
        output.stdout.print("warning: the ranks disagree on the tokens or on what each layer kept", markup=False)
