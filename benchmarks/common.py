"""Shared by benchmark scripts: device facts, and writing a section of docs/benchmarks.md.

Each script owns one section between `<!-- section:NAME -->` markers and rewrites only that section, with the
device, date, commit and command that produced it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
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


def header(title: str) -> str:
    cmd = " ".join(["python", *[a if " " not in a else repr(a) for a in sys.argv]])
    today = _dt.date.today().isoformat()
    return (f"## {title}\n\n- device: {device_line()}\n- date: {today}\n- commit: {commit()}\n"
            f"- command: `{cmd}`\n\n")


def header_facts(text: str) -> dict[str, str]:
    """The `- key: value` lines of a `header()` (device, date, commit, command) as a dict."""
    return dict(line[2:].split(": ", 1) for line in text.splitlines() if line.startswith("- ") and ": " in line)


def write_section(name: str, markdown: str, path: Path | str = DOCS) -> Path:
    """Replace (or append) the section `name` of the benchmarks document."""
    path = Path(path)
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
    Path(path).write_text(json.dumps(obj, indent=1, default=str))


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Markdown table from dict rows; `columns` is [(key, header)]."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"
