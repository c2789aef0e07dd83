"""Helpers shared by the bad-input tests: an isolated environment for ``chiffon`` subprocesses."""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: The virtual environment's scripts (``chiffon``, ``celery``) beside the running interpreter.
BIN = Path(sys.executable).parent
CHIFFON = str(BIN / "chiffon")
CELERY = str(BIN / "celery")


def isolated_env(home: Path, state: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A clean environment: no inherited ``CHIFFON_*`` (or anything else but ``PATH``)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_STATE_HOME": str(state),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.update(extra or {})
    return env
