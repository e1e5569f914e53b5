"""Generate from a prompt under a budgeted KV cache and show what the cache held and dropped, per layer."""

from __future__ import annotations

from kvscope.cli import common, output

HELP = "generate under a budgeted KV cache; print the text and a per-layer KV table"


def add_arguments(p) -> None:
    common.add_model_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=True,
                      help="apply the chat template (default)")
    chat.add_argument("--raw", dest="chat", action="store_false", help="feed the text as is")
    common.add_cache_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    output.add_format(p)


def run(args) -> int:
    from kvscope.errors import require_positive
    from kvscope.runtime.session import read_prompt, run_prompt

    text = read_prompt(args.prompt, args.prompt_file)
    common.check_policy_args(args)
    require_positive("--max-new-tokens", args.max_new_tokens, option="--max-new-tokens")
    loaded = common.load_model(args)
    with output.progress() as bar:
        task = bar.add_task("generating", total=None)

        def on_phase(phase, done, total):
            bar.update(task, description=phase, completed=done, total=total)

        result = run_prompt(loaded.model, loaded.tokenizer, text, chat=args.chat, policy=args.policy,
                            budget_tokens=args.budget, kv_dtype=args.kv_dtype, max_new_tokens=args.max_new_tokens,
                            chunk_size=args.chunk_size, on_phase=on_phase)
    payload = {"model": loaded.spec.name, **result.to_dict()}
    output.emit(payload, args.format, render)
    return 0


def render(d: dict) -> None:
    from rich.table import Table

    out = output.stdout
    out.print(d["text"], markup=False, highlight=False)
    t = Table(title=f"KV cache per layer: policy {d['policy']}, budget {d['budget_tokens']} tokens, {d['kv_dtype']}",
              title_justify="left")
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
    if d.get("budget_note"):
        rows.append(("note", d["budget_note"]))
    out.print(output.kv_table("totals", rows))
