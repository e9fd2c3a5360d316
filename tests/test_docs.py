"""docs/ stays true: the generated pages equal what their generators make from the code now (the
format from its construct declaration, the CLI from its parsers), and every page the README and
docs/README.md link exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyvmm import cli_doc
from pyvmm.migration import format_doc

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.mark.parametrize("page, render, command", [
    ("format.md", format_doc.render, "python -m pyvmm.migration.format_doc > docs/format.md"),
    ("cli.md", cli_doc.render, "python -m pyvmm.cli_doc > docs/cli.md"),
])
def test_a_generated_page_is_what_its_generator_makes(page: str, render: object,
                                                      command: str) -> None:
    assert callable(render)
    assert (DOCS / page).read_text() == render(), f"docs/{page} is stale: run {command}"


def test_the_format_page_names_every_structure_and_the_compressed_record() -> None:
    text = (DOCS / "format.md").read_text()
    for name in ("HeaderSlot", "PageRun", "PageIndex", "StatsBlob", "ChecksumBlob"):
        assert f"### {name}" in text
    assert "RUN_COMPRESSED" in text and "0x400" in text


def test_every_linked_doc_exists() -> None:
    for page in (ROOT / "README.md", DOCS / "README.md"):
        for target in re.findall(r"\]\(((?:docs/)?[\w./-]+\.(?:md|png))\)", page.read_text()):
            path = (page.parent / target).resolve()
            assert path.exists(), f"{page.name} links {target}, which does not exist"
