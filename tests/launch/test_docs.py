"""The documentation holds together: every relative link resolves, and the README leads with the commands."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers.launchers import ROOT

LINK = re.compile(r"\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    return sorted(path for path in ROOT.rglob("*.md") if not {".venv", ".git", "build"} & set(path.parts))


def test_every_relative_link_in_the_docs_resolves() -> None:
    broken = []
    for doc in markdown_files():
        for target in LINK.findall(doc.read_text()):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            if not (doc.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, f"links to missing files: {broken}"


def test_readme_leads_with_the_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.index("bash launch/dev.sh demo") < readme.index("## In ten lines") < readme.index("## Launch")
    assert "bash launch/dev.sh test" in readme


def test_docs_name_no_module_that_is_gone() -> None:
    # Paths like distaccum/engine.py or tests/test_faults.py left behind by a move.
    stale = []
    for doc in markdown_files():
        for path in re.findall(
            r"(?<![\w/.])((?:distaccum|tests|examples|launch)/[\w/]+\.(?:py|md|sh|json|yaml))", doc.read_text()
        ):
            if not (ROOT / path).exists():
                stale.append(f"{doc.relative_to(ROOT)}: {path}")
    assert not stale, f"docs name files that do not exist: {stale}"
