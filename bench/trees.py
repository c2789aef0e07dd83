"""The code trees a benchmark compares: this checkout, and a baseline revision of it.

Stdlib only: a benchmark's child process imports it before it puts the tree it measures
(this one or the baseline's) on ``sys.path``.
"""

from __future__ import annotations

import subprocess
import tarfile
from io import BytesIO
from pathlib import Path

#: The checkout the benchmarks run from.
ROOT = Path(__file__).resolve().parent.parent


def baseline_tree(rev: str, into: Path) -> Path:
    """``chiffon_worker`` as of ``rev`` (``git archive``), extracted under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev,
                              "chiffon_worker"], capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"cannot extract the baseline {rev}: "
                         f"{archive.stderr.decode(errors='replace').strip()}")
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into
