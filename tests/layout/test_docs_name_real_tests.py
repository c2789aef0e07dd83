"""Every test the docs cite as proof of a promise exists.

docs/guarantees.md (and the other docs) name tests as `` `tests/path.py::test_name` ``,
`` `test_file.py::test_name` `` or `` `::test_name` `` (same file as the previous one);
a renamed or deleted test must not leave a promise pointing at nothing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_SPAN = re.compile(r"`([^`\s]*(?:\.py|::)[^`\s]*)`")


def _test_file(name: str) -> Path | None:
    if name.startswith("tests/"):
        path = ROOT / name
        return path if path.is_file() else None
    found = sorted((ROOT / "tests").rglob(Path(name).name))
    return found[0] if len(found) == 1 else None


def _defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)}


def _citations() -> list[tuple[str, str, str | None]]:
    """(doc, file reference, test name or None) for every cited test file or test."""
    found: list[tuple[str, str, str | None]] = []
    for doc in DOCS:
        current: str | None = None
        for span in _SPAN.findall(doc.read_text(encoding="utf-8")):
            file_part, _, test = span.partition("::")
            if file_part:
                if not (file_part.startswith(("tests/", "test_")) and file_part.endswith(".py")):
                    continue
                current = file_part
            if current is None:
                continue
            found.append((doc.name, current, test.split("[")[0] or None))
    return found


def test_the_docs_cite_tests_at_all() -> None:
    assert len(_citations()) > 20


def test_every_cited_test_file_and_test_exists() -> None:
    missing = []
    for doc, file_ref, test in _citations():
        path = _test_file(file_ref)
        if path is None:
            missing.append(f"{doc}: {file_ref}")
        elif test is not None and test not in _defined_names(path):
            missing.append(f"{doc}: {file_ref}::{test}")
    assert not missing, "cited but not found:\n" + "\n".join(sorted(set(missing)))
