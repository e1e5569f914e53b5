"""Turn kvscope's planner into vLLM's or SGLang's own flags: how much memory each step of the engine's start-up takes
(weights, activation peak, CUDA graphs, headroom), how many KV tokens that leaves, how many requests of
--max-model-len fit, and the full command line. Flag combinations the engine would refuse are refused with its reason.

--from-log FILE reads the engine's start-up log (its capacity lines and the flags it ran with) and sets kvscope's
prediction for the same flags beside each number, saying why they differ."""

from __future__ import annotations

from kvscope.cli import output
from kvscope.engines.advice import ENGINES
from kvscope.kvformats import KV_FORMATS
from kvscope.planner.gpus import GPUS

HELP = "vLLM / SGLang flags from the planner, with the numbers; --from-log checks a start-up log"


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="catalogue name (llama-3.1-8b), Hugging Face id of a catalogue model "
                   "(meta-llama/Llama-3.1-8B-Instruct) or local model directory; with --from-log, the log's model")
    p.add_argument("--engine", choices=ENGINES, default=None, help="vllm or sglang (with --from-log: detected)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--gpu", help="GPU from the catalogue: " + ", ".join(GPUS) + " (default H100-80GB)")
    target.add_argument("--gpu-memory", metavar="SIZE", help="GPU memory as CUDA reports it, e.g. 79.2GiB")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest request in tokens (vLLM --max-model-len, SGLang --context-length; default the "
                   "model's)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="requests of --max-model-len tokens that must fit at once (vLLM --max-num-seqs, SGLang "
                   "--max-running-requests)")
    p.add_argument("--kv-dtype", choices=list(KV_FORMATS), default=None, help="KV cache storage "
                   "(vLLM --kv-cache-dtype fp8, SGLang fp8_e4m3; default: the model dtype)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (memory is per GPU)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"), help="weights (default bf16)")
    p.add_argument("--gpu-memory-utilization", "--mem-fraction-static", dest="memory_fraction", type=float,
                   default=None, help="the engine's memory fraction to check instead of choosing one")
    p.add_argument("--max-num-batched-tokens", "--chunked-prefill-size", dest="batched_tokens", type=int,
                   default=None, help="tokens per prefill step (default: the engine's for this GPU)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="vLLM --enforce-eager / SGLang --disable-cuda-graph")
    p.add_argument("--offline", action="store_true", help="vLLM's LLM class rather than `vllm serve` (other defaults)")
    p.add_argument("--engine-version", default=None, help="the release to model (default: vLLM 0.33.0, SGLang 0.5.23)")
    p.add_argument("--from-log", metavar="FILE", default=None, help="an engine start-up log to compare against")
    output.add_format(p)


def request_from(args):
    from kvscope.engines.advice import Request

    return Request(engine=args.engine or "vllm", model=args.model or "", gpu=args.gpu, gpu_memory=args.gpu_memory,
                   max_model_len=args.max_model_len, concurrency=args.concurrency, kv_dtype=args.kv_dtype, tp=args.tp,
                   dtype=args.dtype, engine_version=args.engine_version, memory_fraction=args.memory_fraction,
                   batched_tokens=args.batched_tokens, no_cuda_graphs=args.no_cuda_graphs, offline=args.offline)


def run(args) -> int:
    from dataclasses import replace

    from kvscope.errors import usage

    req = request_from(args)
    if args.from_log:
        from kvscope.engines.compare import compare
        from kvscope.engines.logs import parse_log

        facts = parse_log(args.from_log, args.engine)
        model = args.model or facts.get("model")
        if not model:
            raise usage(f"{args.from_log} does not name its model", expected="MODEL on the command line", fix="MODEL")
        advice, lines = compare(facts, replace(req, model=model))
        payload = {**advice.to_dict(), "log": facts.to_dict(), "comparison": [ln.to_dict() for ln in lines]}
    else:
        if args.engine is None or args.model is None:
            raise usage("advise needs --engine and MODEL (or --from-log FILE)",
                        expected="e.g. kvscope advise --engine vllm llama-3.1-8b --gpu H100-80GB",
                        fix="--engine and MODEL")
        from kvscope.engines.advise import advise

        payload = advise(req).to_dict()
    output.emit(payload, args.format, render)
    return 0


def _verdict(d: dict) -> str:
    if d["refusal"]:
        return f"{d['engine']} would stop at start-up: {d['refusal']}"
    base = (f"{d['kv_tokens']:,} KV tokens: {d['max_concurrency']:.2f} requests of {d['max_model_len']:,} tokens "
            "at once")
    if d["concurrency"] is None:
        return base
    verdict = "fits" if d["fits"] else "does NOT fit"
    return (f"needed {d['needed_tokens']:,} tokens ({d['concurrency']} x {d['max_model_len']:,}), available "
            f"{d['kv_tokens']:,}: {verdict}")


def render(d: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    g = output.gib
    title = f"{d['engine']} {d['version']}: {d['model']} on {d['device']['name']}"
    t = Table(title=title, title_justify="left")
    for col in ("memory", "bytes", "how"):
        t.add_column(col)
    for row in d["rows"]:
        t.add_row(row["item"], g(row["bytes"]) if row["bytes"] is not None else "", escape(row["how"]))
    output.stdout.print(t)
    output.stdout.print(escape(_verdict(d)), highlight=False)
    if d["fixes"]:
        f = Table(title="Fixes (needed / available / estimate, in tokens)", title_justify="left")
        for col in ("fix", "flag", "needed", "available", "estimate", "fits"):
            f.add_column(col)
        for x in d["fixes"]:
            f.add_row(x["action"], x["flags"], f"{x['needed_tokens']:,}", f"{x['available_tokens']:,}",
                      f"{x['estimate_tokens']:,}", "yes" if x["fits"] else "no")
        output.stdout.print(f)
    if d.get("comparison"):
        c = Table(title=f"Log {d['log']['path']} vs kvscope", title_justify="left")
        for col in ("quantity", "log", "kvscope", "diff", "why"):
            c.add_column(col)
        for ln in d["comparison"]:
            err = "-" if ln["error"] is None else f"{ln['error']:+.2%}"
            c.add_row(ln["quantity"], f"{ln['log']:,} {ln['unit']}", f"{ln['kvscope']:,} {ln['unit']}", err,
                      escape(ln["why"]))
        output.stdout.print(c)
    for w in d["warnings"]:
        output.stdout.print(f"warning: {escape(w)}", highlight=False)
    output.stdout.print("command:\n  " + escape(d["command"]), highlight=False, soft_wrap=True)
    if d["alternative"]:
        output.stdout.print("or pin the pool instead of profiling (ignores --gpu-memory-utilization):\n  "
                            + escape(d["alternative"]), highlight=False, soft_wrap=True)
