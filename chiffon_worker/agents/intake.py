"""``WorkIntake``: whether an agent takes new pool work, and how much work runs on it now.

The snapshot reports both (``accepting``, ``accepting_reason``, ``work_running``) so the
orchestrator can tell a draining agent (not accepting, work still running) from a drained
one (not accepting, nothing running). Reading them costs a lock, never a broker call.
The worker sets :meth:`WorkIntake.stop` / :meth:`WorkIntake.resume` when it stops or
resumes consuming the pool queue, and counts ``execute_work`` with :meth:`WorkIntake.running`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class WorkIntake:
    """Thread-safe intake state of one agent process.

    ``counted``: whether work runs in this process, so :attr:`work_running` is a fact
    (False for the prefork pool, whose work runs in child processes: the count is null).
    """

    def __init__(self, *, counted: bool = True) -> None:
        self._lock = threading.Lock()
        self._counted = counted
        self._running = 0
        self._reason: str | None = None  # None: accepting

    @property
    def accepting(self) -> bool:
        """Whether the agent consumes its pool queue."""
        with self._lock:
            return self._reason is None

    @property
    def work_running(self) -> int | None:
        """``execute_work`` requests running now (None when not counted here)."""
        with self._lock:
            return self._running if self._counted else None

    def stop(self, reason: str) -> None:
        """The agent no longer consumes its pool queue, because of ``reason``."""
        with self._lock:
            self._reason = reason

    def resume(self) -> None:
        """The agent consumes its pool queue again."""
        with self._lock:
            self._reason = None

    @contextmanager
    def running(self) -> Iterator[None]:
        """Count one running ``execute_work`` for the duration of the block."""
        with self._lock:
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1

    def snapshot_keys(self) -> dict[str, Any]:
        """``accepting``, ``accepting_reason`` and ``work_running`` for the snapshot."""
        with self._lock:
            return {"accepting": self._reason is None, "accepting_reason": self._reason,
                    "work_running": self._running if self._counted else None}
