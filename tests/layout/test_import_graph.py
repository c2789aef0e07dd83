"""``chiffon_worker`` has no import cycles, counting imports inside functions and classes
named by string; and the checker itself finds the cycles it must."""

from __future__ import annotations

from pathlib import Path

from tests.layout.import_graph import find_cycle, import_graph

ROOT = Path(__file__).resolve().parents[2]


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_chiffon_worker_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph(ROOT, "chiffon_worker"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import thing\n",
        "pkg/b.py": "def thing():\n    from pkg import a\n    return a\n",
    })
    assert find_cycle(import_graph(tmp_path, "pkg")) == ["pkg.a", "pkg.b", "pkg.a"]


def test_a_cycle_through_a_class_named_by_string_is_found(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/app.py": "SETTINGS = {'consumer': 'pkg.steps:Consumer'}\n",
        "pkg/steps.py": "from pkg.app import SETTINGS\nclass Consumer: ...\n",
    })
    assert find_cycle(import_graph(tmp_path, "pkg")) == ["pkg.app", "pkg.steps", "pkg.app"]


def test_relative_imports_are_resolved(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "from . import low\n",
        "pkg/sub/low.py": "from ..top import x\n",
        "pkg/top.py": "from .sub import low\nx = 1\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub"] == {"pkg.sub.low"}
    assert graph["pkg.sub.low"] == {"pkg.top"}
    assert graph["pkg.top"] == {"pkg.sub.low"}
    assert find_cycle(graph) == ["pkg.sub.low", "pkg.top", "pkg.sub.low"]


def test_imports_in_one_direction_are_no_cycle(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": ("def __getattr__(name):\n"
                            "    from pkg.app import get\n"
                            "    return get()\n"),
        "pkg/app.py": "from pkg.low import x\ndef get(): return x\n",
        "pkg/low.py": "x = 1\n",
    })
    assert find_cycle(import_graph(tmp_path, "pkg")) is None
