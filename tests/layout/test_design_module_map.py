"""docs/design.md's module map names every module of the package, and nothing that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOT_LISTED = {"__init__.py", "__main__.py", "_version.py"}


def _map_block() -> str:
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    start = text.index("```\nchiffon_worker/")
    return text[start:text.index("```", start + 3)]


def _listed_files() -> set[str]:
    """Paths (relative to the project) of the modules the map lists, from its indentation."""
    listed: set[str] = set()
    stack: list[str] = []
    for line in _map_block().splitlines():
        match = re.match(r"^( *)(\S+?\.py|\S+?/)(\s|$)", line)
        if not match:
            continue
        depth = len(match.group(1)) // 2
        stack = [*stack[:depth], match.group(2).rstrip("/")]
        if match.group(2).endswith(".py"):
            listed.add("/".join(stack))
    return listed


def test_every_module_is_in_the_design_module_map() -> None:
    present = {str(path.relative_to(ROOT)) for path in (ROOT / "chiffon_worker").rglob("*.py")
               if path.name not in NOT_LISTED}
    assert present - _listed_files() == set()


def test_the_module_map_lists_no_module_that_is_gone() -> None:
    listed = {path for path in _listed_files() if path.startswith("chiffon_worker/")}
    assert {path for path in listed if not (ROOT / path).is_file()} == set()
