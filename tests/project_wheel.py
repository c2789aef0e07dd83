"""Building this checkout's wheel, as ``pip wheel`` would for a release.

The tree is copied first (setuptools writes ``build/`` and ``*.egg-info`` into the tree it
builds, and other engineers' processes read the checkout meanwhile); what never goes into
the wheel (git, the venv, benchmarks, tests) is left out of the copy. About 2-3 s here.
The session fixture ``project_wheel`` (tests/conftest.py) builds it once per test run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Not copied: nothing of these belongs in the wheel.
LEFT_OUT = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "bench", "tests",
            ".mypy_cache", ".ruff_cache", ".pytest_cache")


def build_wheel(workdir: Path) -> Path:
    """Build ``chiffon_worker-*.whl`` from a copy of the checkout under ``workdir``; returns
    the wheel's path. Raises AssertionError with pip's output when the build fails."""
    source = workdir / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*LEFT_OUT))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
         "-q", "-w", str(workdir), str(source)],
        capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, f"pip wheel failed:\n{built.stdout}{built.stderr}"
    (wheel,) = workdir.glob("chiffon_worker-*.whl")
    return wheel
