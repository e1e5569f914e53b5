"""Write a doctor report into a directory, all or nothing.

Everything is rendered in memory first, then written and fsynced into a hidden staging directory, and only then
renamed into place:

* out_dir missing or empty: the staging directory (a hidden sibling of out_dir) is renamed onto out_dir in one
  step, so out_dir holds either the complete report or nothing.
* out_dir already has files: refused (a `UsageError` naming --out), unless `force`: then the staging directory is
  made inside out_dir (same file system), each file is renamed over its old version, report.html last, and a file of
  the earlier report that the new one does not have (a memory snapshot) is removed, so files of two runs never mix.
  Other files are left alone. Each file is always whole; any failure while rendering, serialising, writing or
  copying the snapshot leaves the old report untouched.
* `update=True`: the same run writes its report again (the doctor, after the fix's re-run): report.json and
  report.html are replaced, the snapshot written the first time stays.

A crash leaves at most a hidden `.<name>.kvscope-partial-*` / `.kvscope-partial-*` directory, which never looks like
a report.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kvscope.errors import usage
from kvscope.report.html import render_html
from kvscope.report.model import DoctorReport

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
SNAPSHOT_NAME = "memory_snapshot.pickle"
_PARTIAL = ".kvscope-partial-"
_FIX = "--out (an existing writable directory, or a new path in one)"


def _entries(p: Path) -> list[str]:
    """What a directory holds, less the hidden staging directories a crashed write may leave."""
    return sorted(e.name for e in p.iterdir() if not e.name.startswith((_PARTIAL, f".{p.name}{_PARTIAL}")))


def check_out_dir(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Check early that a report can be written at `path`; returns the absolute path. Creates nothing.

    Raises a `UsageError` (a ValueError) naming the path when it is a file, sits under a file, when the directory
    (or, for a new path, its nearest existing parent) is not writable, or when it already holds files and `force` is
    false (a report never lands among the files of another run).
    """
    if path is None or str(path).strip() == "":
        raise usage("no output directory given", expected="a directory path", fix="--out")
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise usage(f"output directory {p} is a file, not a directory", expected="a directory for the report",
                    fix=_FIX)
    existing = p
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise usage(f"cannot create output directory {p}: {existing} is a file", expected="a directory path",
                    fix=_FIX)
    try:  # os.access is not enough (root, read-only mounts, ACLs): try to create a file
        fd, probe = tempfile.mkstemp(prefix=_PARTIAL + "probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        what = f"output directory {p}" if existing == p else f"cannot create output directory {p}: {existing}"
        raise usage(f"{what} is not writable ({exc.strerror or exc})", expected="a writable directory",
                    fix=_FIX) from exc
    if not force and p.is_dir() and _entries(p):
        held = _entries(p)
        listed = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise usage(f"output directory {p} is not empty (it holds {listed})", expected="a new or empty directory, so "
                    "that files of two runs never mix", fix="--out, or add --force to replace an earlier report there")
    return p


def _jsonable(obj: Any) -> Any:
    """A copy that json can write as strict JSON: NaN/inf become null; paths, numpy scalars and the rest, text."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item):
        with contextlib.suppress(Exception):
            return _jsonable(item())
    tolist = getattr(obj, "tolist", None)  # small arrays
    if callable(tolist):
        with contextlib.suppress(Exception):
            return _jsonable(tolist())
    return str(obj)


def _write_file(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _place_snapshot(src: Path, dst: Path, move: bool) -> None:
    """Moving: a hard link when src is on the same file system (instant, no space). Otherwise a copy."""
    if move:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_report(out_dir: str | os.PathLike, report: DoctorReport | dict,
                 snapshot_src: str | os.PathLike | None = None, *, move_snapshot: bool = False, force: bool = False,
                 update: bool = False) -> dict[str, Path]:
    """Write report.json (indent 2), report.html and, if given, the snapshot as memory_snapshot.pickle.

    Returns {"json": path, "html": path} plus "snapshot": path when the report has one. The snapshot source is
    kept unless `move_snapshot` is true, in which case it is removed once the report is in place. When a snapshot is
    written, the report's "snapshot" field is set to its file name (in the files, not in the caller's dict).
    `out_dir` must be new or empty unless `force` (replace an earlier report) or `update` (this run's own report).
    """
    out = check_out_dir(out_dir, force=force or update)
    src = None
    if snapshot_src is not None:
        src = Path(snapshot_src).expanduser()
        if not src.is_file():
            raise usage(f"memory snapshot {src} does not exist or is not a file", expected="a snapshot file",
                        fix="the snapshot path passed to write_report")

    # everything that can fail on bad data happens before the disk is touched
    data = report.to_dict() if isinstance(report, DoctorReport) else dict(report)  # the one serialisation
    keep_snapshot = update and src is None and (out / SNAPSHOT_NAME).is_file()
    if src is not None or keep_snapshot:
        data["snapshot"] = SNAPSHOT_NAME
    text_json = json.dumps(_jsonable(data), indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    text_html = render_html(data)

    # a symlinked out_dir is filled file by file: renaming onto it would replace the link, not fill its target
    whole_dir = not out.is_symlink() and (not out.exists() or not _entries(out))
    if whole_dir:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}{_PARTIAL}", dir=out.parent))
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700; the report directory gets the usual mode
    else:
        stage = Path(tempfile.mkdtemp(prefix=_PARTIAL, dir=out))
    names = [REPORT_JSON, REPORT_HTML] + ([SNAPSHOT_NAME] if src is not None else [])
    try:
        if src is not None:
            _place_snapshot(src, stage / SNAPSHOT_NAME, move_snapshot)
        _write_file(stage / REPORT_JSON, text_json)
        _write_file(stage / REPORT_HTML, text_html)
        _fsync_dir(stage)
        committed = False
        if whole_dir:
            try:
                os.rename(stage, out)  # replaces out only if it is (still) missing or empty
                committed = True
            except OSError:
                out.mkdir(parents=True, exist_ok=True)  # someone filled it meanwhile: fall back to per-file
        if not committed:
            # the snapshot first and the page last: report.html appears only once everything it links to exists
            for name in (SNAPSHOT_NAME, REPORT_JSON, REPORT_HTML):
                if name in names:
                    os.replace(stage / name, out / name)
            if not keep_snapshot and src is None:  # the earlier run's snapshot must not pass for this run's
                with contextlib.suppress(FileNotFoundError):
                    (out / SNAPSHOT_NAME).unlink()
        _fsync_dir(out)
        _fsync_dir(out.parent)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)

    if src is not None and move_snapshot:
        with contextlib.suppress(OSError):
            src.unlink()
    paths = {"json": out / REPORT_JSON, "html": out / REPORT_HTML}
    if src is not None or keep_snapshot:
        paths["snapshot"] = out / SNAPSHOT_NAME
    return paths
