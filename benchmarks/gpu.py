"""One GPU session: the chosen parts, each a benchmark script run as its own process (a fresh allocator, a timeout of
its own), every output under one directory that the device machine sends back whole.

    python -m benchmarks gpu --parts tests,runtime,kv_speed,planner,doctor --out DIR

On the GPU machine only `PYTHONPATH=$PWD/src:$PWD` is needed (no install). DIR holds at most one file per part plus
`log.txt` (the device line, versions, each part's command, exit code and the end of its output), all at the top
level: the runtime part's files are bundled into `runtime.json`, the doctor keeps only its report.json. The whole
session ends before `--deadline` seconds: a part that would not finish in the time left is cut short (its last
checkpoint stays) or skipped, and the log says so. `python -m benchmarks render DIR` then puts the data into
docs/data and rewrites the sections of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import ROOT

FILES_AT_MOST = 8  # what the device machine sends back; two folders deep at most (here: none)


@dataclass(frozen=True)
class Part:
    args: tuple[str, ...]  # after `python`; {out} is the part's output path
    timeout: int  # seconds
    output: str | None  # the file it leaves in DIR


PARTS = {
    "tests": Part(("-m", "pytest", "-q", "--gpu", "-m", "gpu", "tests", "-p", "no:cacheprovider"), 300, None),
    "runtime": Part(("-m", "benchmarks.runtime", "--out", "{out}"), 560, "runtime.json"),
    "kv_speed": Part(("-m", "benchmarks.kv_speed", "--out", "{out}"), 400, "kv_speed.json"),
    "decode_kernel": Part(("-m", "benchmarks.decode_kernel", "--out", "{out}"), 170, "decode_kernel.json"),
    "weights": Part(("-m", "benchmarks.weights", "--parts", "gpu", "--out", "{out}"), 240, "weights-cuda.json"),
    "planner": Part(("-m", "benchmarks.planner_accuracy", "--quick", "--out", "{out}"), 280, "planner_accuracy.json"),
    "doctor": Part(("-m", "kvscope", "doctor", "llama-3-8b", "--random-weights", "--batch", "64", "--context", "8000",
                    "--new-tokens", "16", "--fix", "--format", "json", "--out", "{out}"), 240, "doctor.json"),
}
LOG_TAIL = 40  # lines of each part's output kept in the log


def run(parts: list[str], out: Path, deadline: float, extra: dict[str, list[str]] | None = None) -> int:
    """Run `parts` in order into `out`; 0 when every part ran and exited 0."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    log.write_text(_facts())
    start, worst = time.monotonic(), 0
    for name in parts:
        left = deadline - (time.monotonic() - start) - 10
        part = PARTS[name]
        if left < 30:
            _append(log, f"\n== {name}: skipped, {max(0, left):.0f} s left of --deadline\n")
            worst = worst or 1
            continue
        worst = max(worst, _run_part(name, part, out, min(part.timeout, int(left)), (extra or {}).get(name, []),
                                     log))
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) > FILES_AT_MOST:
        _append(log, f"\nwarning: {len(files)} files under {out}, more than the {FILES_AT_MOST} that come back\n")
    return worst


def _run_part(name: str, part: Part, out: Path, timeout: int, extra: list[str], log: Path) -> int:
    with tempfile.TemporaryDirectory(prefix=f"kvscope-{name}-") as work:
        target = Path(work) / "out" if name in ("runtime", "doctor") else out / (part.output or "")
        if name == "weights":  # it names its own file in the directory
            target = out
        args = [sys.executable, *(a.format(out=target) for a in part.args), *extra]
        t = time.monotonic()
        try:
            done = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
            code, text = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            code, text = 124, _text(exc.stdout) + _text(exc.stderr) + f"\n(timed out after {timeout} s)"
        tail = "\n".join(text.splitlines()[-LOG_TAIL:])
        _append(log, f"\n== {name}: exit {code} in {time.monotonic() - t:.0f} s\n$ python {' '.join(args[1:])}\n"
                     f"{tail}\n")
        if name == "runtime":
            _bundle(Path(work) / "out", out / "runtime.json")
        elif name == "doctor" and (Path(work) / "out" / "report.json").exists():
            shutil.copy(Path(work) / "out" / "report.json", out / "doctor.json")  # the html is rendered from it
    return code


def _bundle(directory: Path, path: Path) -> None:
    """runtime-<part>.json files as one {name: data} file (what the runtime part saved before any timeout)."""
    parts = {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("runtime-*.json"))}
    if parts:
        path.write_text(json.dumps(parts, indent=1))


def _env() -> dict[str, str]:
    paths = [str(ROOT / "src"), str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), TRANSFORMERS_NO_ADVISORY_WARNINGS="1")


def _facts() -> str:
    from benchmarks.common import commit, device_line

    try:
        device = device_line()
    except Exception as exc:  # noqa: BLE001 - the log says why, the parts still run
        device = f"unknown ({type(exc).__name__}: {exc})"
    return f"device: {device}\ncommit: {commit()}\ndate: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"


def _append(log: Path, text: str) -> None:
    with open(log, "a") as f:
        f.write(text)
    print(text, end="", flush=True)


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")
