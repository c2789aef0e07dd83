"""Helpers of the config specs: write a config file, load a Config without the machine's
``/etc/chiffon/agent.yml`` (HOME is the test's, see the ``clean_env`` fixture)."""

from __future__ import annotations

import os
from pathlib import Path

from chiffon_worker.config import Config

#: A system config path that never exists, so the machine's own file is never read.
NO_SYSTEM = "/nonexistent/etc/chiffon/agent.yml"


def write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` (creating its directory); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def user_file(text: str) -> Path:
    """Write the user's ``~/.chiffon/agent.yml``."""
    return write(Path(os.environ["HOME"]) / ".chiffon" / "agent.yml", text)


def load(**kwargs: object) -> Config:
    """``Config(**kwargs)`` that ignores the machine's system config file."""
    kwargs.setdefault("system_file", NO_SYSTEM)
    return Config(**kwargs)  # type: ignore[arg-type]
