"""Shared by the benchmark scripts: device facts, timing on the GPU, and writing a section of docs/benchmarks.md.

Each script owns one section between `<!-- section:NAME -->` markers and rewrites only that section, with the
device, date, commit and command that produced it. Scripts run as modules from the repository root
(`python -m benchmarks.<script>`), with `src` on the path when kvscope is not installed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"


def commit() -> str:
    """The commit the run is from: KVSCOPE_COMMIT when set (a copy of the tree without its git history, such as the
    GPU machine's, names it so), else git's HEAD (+ "local changes" when tracked files differ)."""
    if os.environ.get("KVSCOPE_COMMIT"):
        return os.environ["KVSCOPE_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+local changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("KVSCOPE_COMMIT", "unknown")


def device_line() -> str:
    import torch
    import transformers

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        dev = f"{props.name}, {props.total_memory:,} bytes"
    else:
        dev = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    return f"{dev}; {versions}, Python {platform.python_version()}"


OUTPUT_OPTIONS = ("--out", "--json", "--plot", "--docs")  # where a run wrote its files: not what it measured


def command_line() -> str:
    """The command that is running, as typed (`python -m benchmarks.<script> ...`), less the options that only say
    where its files go: a section names what produced its figures, never a path of the machine that ran it."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    script = ["-m", spec.name.removesuffix(".__main__")] if spec is not None and spec.name else sys.argv[:1]
    words, skip = [], False
    for a in sys.argv[1:]:
        if skip or a.split("=")[0] in OUTPUT_OPTIONS:
            skip = not skip and "=" not in a
            continue
        words.append(a if " " not in a else repr(a))
    return " ".join(["python", *script, *words])


def header(title: str) -> str:
    cmd = command_line()
    today = _dt.date.today().isoformat()
    return (f"## {title}\n\n- device: {device_line()}\n- date: {today}\n- commit: {commit()}\n"
            f"- command: `{cmd}`\n\n")


def run_meta() -> dict[str, str]:
    """What a run's JSON records about itself, so that its section can be written later, on another machine."""
    return {"device": device_line(), "date": _dt.date.today().isoformat(), "commit": commit(),
            "command": command_line()}


def data_path(section: str) -> Path:
    """Where a section's input lives in the repository: docs/data/<section>.json."""
    return ROOT / "docs" / "data" / f"{section}.json"


def section_head(title: str, meta: dict, data: str, rebuild: str, section: str | None = None) -> str:
    """The title and provenance lines of a section written from saved data, then the hand-written notes on that run
    (docs/data/<section>.md) when there are any."""
    md = (f"## {title}\n\n- device: {meta['device']}\n- date: {meta['date']}\n- commit: {meta['commit']}\n"
          f"- command: `{meta['command']}`\n- data: `{data}` (rebuild this section with `{rebuild}`)\n\n")
    notes = data_path(section).with_suffix(".md") if section else None
    if notes is not None and notes.exists():
        md += notes.read_text().strip() + "\n\n"
    return md


def further_runs(more: dict[str, dict], body, what: str = "") -> str:
    """The further runs of a section (`docs/data/<section>.<tag>.json`, by file name): each one's provenance line
    (`what` says how to read it), then `body(run)`."""
    md = ""
    for name, extra in more.items():
        m = extra["meta"]
        note = f" ({extra['note']})" if extra.get("note") else ""
        md += (f"\n\nA further run (`docs/data/{name}`){what}: commit {m['commit']}, {m['date']}, `{m['command']}`"
               f"{note}.\n\n" + body(extra))
    return md


def render_command(script: str, section: str) -> tuple[str, str]:
    """(data path, the command that rewrites `section` from it) for a script's `--render`."""
    data = f"docs/data/{section}.json"
    return data, f"python -m benchmarks.{script} --render {data}"


def header_facts(text: str) -> dict[str, str]:
    """The `- key: value` lines of a `header()` (device, date, commit, command) as a dict."""
    return dict(line[2:].split(": ", 1) for line in text.splitlines() if line.startswith("- ") and ": " in line)


def write_section(name: str, markdown: str, path: Path | str | None = None) -> Path:
    """Replace (or append) the section `name` of the benchmarks document (docs/benchmarks.md unless `path`)."""
    path = Path(path or DOCS)
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery figure here was produced by the script and " \
        "command named under it.\n"
    begin, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def save_json(obj, path: Path | str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(dumps(obj) + "\n")


def dumps(obj, depth: int = 0) -> str:
    """JSON with one row per line: the top two levels of containers are spread over lines, anything deeper (a row, a
    list of numbers) stays on one line, so the files stay small and diff row by row."""
    pad = " " * depth
    if depth < 2 and isinstance(obj, dict) and any(isinstance(v, (dict, list)) and v for v in obj.values()):
        items = [f"{pad} {json.dumps(k)}: {dumps(v, depth + 1).lstrip()}" for k, v in obj.items()]
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if depth < 2 and isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return pad + "[\n" + ",\n".join(dumps(v, depth + 1) for v in obj) + "\n" + pad + "]"
    return pad + json.dumps(obj, default=str, ensure_ascii=False)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Markdown table from dict rows; `columns` is [(key, header)]."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"


# --- the GPU ----------------------------------------------------------------------------------------------------------
def clean() -> int:
    """Free what earlier work left, reset the peak counter, and return the bytes still allocated: the baseline a
    measured peak is read against (0 without CUDA)."""
    import gc

    import torch

    gc.collect()
    if not torch.cuda.is_available():
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def sync() -> None:
    """Wait for the GPU (nothing to wait for without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_us(fn: Callable[[], object], iters: int = 200, warmup: int = 20) -> float:
    """Median over `iters` calls of the CUDA-event time around one call of `fn`, in microseconds (after `warmup`
    calls). Where the kernels are shorter than their launch on the host, that includes the host's gaps."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def plain_decode_tps(model, ids, new: int) -> float:
    """Decode tokens/s of plain transformers generate(): (time for 1 + new tokens - time for 1 token) / new."""
    import torch

    def timed(n: int) -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - t

    timed(2)
    return new / (timed(1 + new) - timed(1))
