"""Worker remote control: ``celery -A chiffon_worker inspect chiffon_metrics``.

Every agent answers with its current snapshot (``seq`` 0: an ad-hoc view, not a heartbeat).
Celery keeps remote-control commands in one process-wide table, so registering twice is
harmless (the second registration replaces the first with the same function).
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command

from chiffon_worker.wire import METRICS_INSPECT_COMMAND
from chiffon_worker.worker.runtime import get_agent


def chiffon_metrics(state: Any) -> dict[str, Any]:
    """The answer to ``inspect chiffon_metrics``: this agent's snapshot, now."""
    return get_agent().snapshot(heartbeat=False)


def register_control_commands() -> None:
    """Add the agent's inspect commands to Celery's remote-control table."""
    inspect_command(name=METRICS_INSPECT_COMMAND)(chiffon_metrics)
