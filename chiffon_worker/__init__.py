"""chiffon_worker: the Chiffon desktop agent.

``celery -A chiffon_worker worker -B`` finds the Celery ``app`` here, and
``from chiffon_worker import app`` is always that app (no submodule is named ``app``).
It is built on first access, not at import, so ``import chiffon_worker`` stays cheap and
side-effect free. The agent's Celery side lives in :mod:`chiffon_worker.worker`.
"""

from __future__ import annotations

from typing import Any

from chiffon_worker._version import __version__

__all__ = ["__version__", "app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from chiffon_worker.worker.factory import get_app

        return get_app()
    raise AttributeError(f"module 'chiffon_worker' has no attribute {name!r}")
