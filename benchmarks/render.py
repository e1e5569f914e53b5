"""docs/benchmarks.md from data: every section rebuilt by the command it names, or a GPU session's output placed in
docs/data first.

    python -m benchmarks render            # rebuild every section from docs/data (what the docs show, nothing else)
    python -m benchmarks render DIR        # DIR from `python -m benchmarks gpu`: its data into docs/data, sections
                                           # rewritten (then `git add docs`)
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

from benchmarks import common

REBUILD = re.compile(r"(?:rebuild this section with|Written from the runs' JSON by) `(python -m benchmarks\.[^`]+)`")


def sections(text: str) -> dict[str, str]:
    """name -> body of every `<!-- section:NAME -->` of the page."""
    return dict(re.findall(r"<!-- section:([\w-]+) -->\n(.*?)<!-- /section:\1 -->", text, re.S))


def commands(text: str) -> dict[str, list[str]]:
    """name -> the command that rebuilds it, as argv (python -m benchmarks.<script> ...)."""
    out = {}
    for name, body in sections(text).items():
        found = REBUILD.search(body)
        if found:
            out[name] = shlex.split(found.group(1))
    return out


def run_command(argv: list[str]) -> None:
    """`python -m benchmarks.<script> ARGS` in this process."""
    assert argv[:2] == ["python", "-m"], argv
    importlib.import_module(argv[2]).main(argv[3:])


def rebuild() -> list[str]:
    """Run each section's command (once per distinct command); the names of the sections."""
    found = commands(common.DOCS.read_text())
    for argv in {tuple(a): a for a in found.values()}.values():
        run_command(argv)
    return list(found)


def place(run_dir: Path) -> list[str]:
    """A GPU session's files as the inputs of their sections, named after them; the sections rewritten."""
    from benchmarks import decode_kernel, kv_speed, planner_accuracy, runtime_render

    data = common.ROOT / "docs" / "data"
    written = []
    if (run_dir / "runtime.json").exists():
        for name, part in json.loads((run_dir / "runtime.json").read_text()).items():
            common.save_json(part, data / f"{name}.json")
            written.append(name)
        runtime_render.render(data)
    if (run_dir / "kv_speed.json").exists():
        for section, part in kv_speed.split_sections(json.loads((run_dir / "kv_speed.json").read_text())).items():
            common.save_json(part, common.data_path(section))
            kv_speed.main(["--render", str(common.data_path(section))])
            written.append(section)
    if (run_dir / "weights-cuda.json").exists():
        from benchmarks import weights

        common.save_json(json.loads((run_dir / "weights-cuda.json").read_text()), data / "weights-cuda.json")
        written += weights.render(data)
    for name, module, default in (("decode_kernel.json", decode_kernel, "decode-kernel"),
                                  ("planner_accuracy.json", planner_accuracy, "planner-accuracy")):
        if (run_dir / name).exists():
            run = json.loads((run_dir / name).read_text())
            section = run["meta"].get("section", default)
            common.save_json(run, common.data_path(section))
            module.main(["--render", str(common.data_path(section))])
            written.append(section)
    return written
