"""docs/architecture.md names every module of the package, and only modules that exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_module_is_in_the_architecture_doc():
    doc = (REPO / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:edge_tune|converters|tui)/[\w/]+\.py)`", doc))
    modules = {p.relative_to(REPO).as_posix() for top in ("edge_tune", "converters", "tui")
               for p in (REPO / top).rglob("*.py")}
    assert not modules - named, f"add to docs/architecture.md: {sorted(modules - named)}"
    assert not named - modules, f"gone, remove from docs/architecture.md: {sorted(named - modules)}"
