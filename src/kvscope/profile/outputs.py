"""Where a profile goes: `<out>/trace.json` (Chrome trace) and `<out>/tensorboard/<run>/` (TensorBoard log directory).

The TensorBoard file is written by `torch.profiler.tensorboard_trace_handler`, which needs neither `tensorboard` nor
its profiler plugin at write time: it only names the file `<host>_<pid>.<ns>.pt.trace.json`. The plugin
(`pip install torch-tb-profiler`, then `tensorboard --logdir <out>/tensorboard`) treats every folder holding such files
as one run, so each run name gets its own folder and repeated runs show as spans of that run.

`trace.json` is replaced only once the new trace is complete, so a failed run leaves an earlier one intact.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

TRACE_NAME = "trace.json"
TENSORBOARD_NAME = "tensorboard"
TB_SUFFIX = ".pt.trace.json"


def prepare_out_dir(path: str | os.PathLike) -> Path:
    """Create the output directory if needed and check that it can be written; a `UsageError` naming `--out` if not."""
    from kvscope.errors import usage

    out = Path(path).expanduser()
    expected = "a directory that exists or can be created, and that this user can write"
    if out.exists() and not out.is_dir():
        raise usage(f"the output path {out} is a file, not a directory", expected=expected, fix="--out")
    for name in (TRACE_NAME, TENSORBOARD_NAME):
        inner = out / name
        if inner.exists() and inner.is_dir() == (name == TRACE_NAME):
            kind = "a directory" if name == TRACE_NAME else "a file"
            raise usage(f"{inner} is {kind}, so the profile cannot be written there", expected=expected,
                        fix="--out, or move that path away")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise usage(f"cannot write to the output directory {out}: {exc.strerror or exc}", expected=expected,
                    fix="--out") from None
    return out


def run_folder_name(name: str) -> str:
    """A run name safe as one folder name (TensorBoard shows it as the run)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "kvscope"


def write_traces(prof, out: Path, run_name: str) -> tuple[Path, Path]:
    """Export the profile once through the TensorBoard handler, then publish the same file as `<out>/trace.json`.

    Returns (trace path, TensorBoard file). A profile can be exported only once, hence the link (or copy)."""
    from torch.profiler import tensorboard_trace_handler

    run_dir = out / TENSORBOARD_NAME / run_folder_name(run_name)
    before = set(run_dir.glob("*" + TB_SUFFIX)) if run_dir.is_dir() else set()
    tensorboard_trace_handler(str(run_dir))(prof)
    written = sorted(set(run_dir.glob("*" + TB_SUFFIX)) - before, key=lambda p: p.stat().st_mtime_ns)
    if not written:
        raise RuntimeError(f"torch.profiler wrote no trace file into {run_dir}")
    tb_file = written[-1]
    trace = out / TRACE_NAME
    partial = out / f".{TRACE_NAME}.partial"
    partial.unlink(missing_ok=True)
    try:
        os.link(tb_file, partial)  # same bytes, no second copy of a trace that can be hundreds of MB
    except OSError:
        shutil.copyfile(tb_file, partial)
    os.replace(partial, trace)
    return trace, tb_file
