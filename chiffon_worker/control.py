"""Worker remote control: ``celery -A chiffon_worker inspect chiffon_metrics``.

Every agent answers with its current snapshot (``seq`` 0: an ad-hoc view, not a heartbeat).
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command

_registered = False


def _chiffon_metrics(state: Any) -> dict[str, Any]:
    from chiffon_worker.app import current_config
    from chiffon_worker.runtime import current_agent

    return current_agent(current_config()).snapshot(heartbeat=False)


def register() -> None:
    """Register the inspect command (once per process)."""
    global _registered
    if not _registered:
        inspect_command(name="chiffon_metrics")(_chiffon_metrics)
        _registered = True
