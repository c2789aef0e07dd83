"""chiffon_worker: the Chiffon desktop agent.

``celery -A chiffon_worker worker -B`` finds the Celery ``app`` here. The app is built on
first access, not at import, so ``import chiffon_worker`` stays cheap and side-effect free.
"""

from __future__ import annotations

from typing import Any

from chiffon_worker._version import __version__

__all__ = ["__version__", "app"]


def __getattr__(name: str) -> Any:
    # "celery" too: once the submodule ``chiffon_worker.app`` is imported, the package
    # attribute ``app`` is that module, and Celery's ``-A chiffon_worker`` then looks for
    # ``chiffon_worker.celery``
    if name in ("app", "celery"):
        from chiffon_worker.app import get_app

        return get_app()
    raise AttributeError(f"module 'chiffon_worker' has no attribute {name!r}")
