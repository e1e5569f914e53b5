"""docs/benchmarks.md is what its data says: every section names the command that rebuilds it from docs/data, and
running every one of them gives the page (and the quality plot) back to the byte; docs/data holds exactly the inputs
the sections name, and no line of them cites a path of the machine that ran it."""

from __future__ import annotations

import contextlib
import io
import re
import shutil

from benchmarks import common, render

ROOT = common.ROOT
DATA = ROOT / "docs" / "data"


def test_every_section_is_rebuilt_from_docs_data(tmp_path, monkeypatch):
    page = ROOT / "docs" / "benchmarks.md"
    copy = tmp_path / "benchmarks.md"
    shutil.copy(page, copy)
    (tmp_path / "quality.svg").write_text("an older plot")
    monkeypatch.setattr(common, "DOCS", copy)
    monkeypatch.chdir(ROOT)  # the commands name their data relative to the repository
    with contextlib.redirect_stdout(io.StringIO()):
        rebuilt = render.rebuild()
    assert set(rebuilt) == set(render.sections(page.read_text()))  # no section without its command
    assert copy.read_text() == page.read_text()
    assert (tmp_path / "quality.svg").read_text() == (ROOT / "docs" / "quality.svg").read_text()


def test_docs_data_holds_the_inputs_of_the_sections_and_nothing_else():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    named = set(re.findall(r"docs/data/([\w.-]+)", text)) | {
        f"{name}.md" for name in render.sections(text) if (DATA / f"{name}.md").exists()}
    for notes in DATA.glob("*.md"):
        named |= set(re.findall(r"docs/data/([\w.-]+)", notes.read_text()))
    assert {p.name for p in DATA.iterdir()} == named
    for p in DATA.iterdir():  # each named after its section
        assert p.name.split(".")[0] in render.sections(text), p.name


def test_no_provenance_line_cites_a_machine_path():
    machine = re.compile(r"(?<![\w.])/(tmp|root|work|home)/")
    for path in [ROOT / "docs" / "benchmarks.md", *DATA.iterdir()]:
        assert not machine.search(path.read_text()), path.name
