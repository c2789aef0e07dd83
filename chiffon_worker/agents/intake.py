"""``WorkIntake``: whether an agent takes new pool work, and how much work runs on it now.

The snapshot reports both (``accepting``, ``accepting_reason``, ``work_running``) so the
orchestrator can tell a draining agent (not accepting, work still running) from a drained
one (not accepting, nothing running). Reading them costs a lock, never a broker call.
Two things can hold the pool queue: an operator's drain (:data:`DRAIN`) and the owner
rules (:data:`OWNER`, ``agents/owner_rules.py``). Each holds with :meth:`WorkIntake.stop`
and lets go with :meth:`WorkIntake.resume`; the agent consumes its pool queue while
nothing holds it, and ``accepting_reason`` says why it does not (a drain first). The
worker counts ``execute_work`` with :meth:`WorkIntake.running`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

#: What may hold the pool queue: an operator's drain, or the owner rules.
Hold = Literal["drain", "owner"]
DRAIN: Hold = "drain"
OWNER: Hold = "owner"


class WorkIntake:
    """Thread-safe intake state of one agent process.

    ``counted``: whether work runs in this process, so :attr:`work_running` is a fact
    (False for the prefork pool, whose work runs in child processes: the count is null).
    """

    def __init__(self, *, counted: bool = True) -> None:
        self._lock = threading.Lock()
        self._counted = counted
        self._running = 0
        self._holds: dict[Hold, str] = {}  # empty: accepting
        self._handing: set[threading.Event] = set()  # of the work running now

    @property
    def accepting(self) -> bool:
        """Whether the agent consumes its pool queue."""
        with self._lock:
            return not self._holds

    def held_by(self, hold: Hold) -> str | None:
        """The reason ``hold`` holds the pool queue for, or None when it does not."""
        with self._lock:
            return self._holds.get(hold)

    def _reason(self) -> str | None:
        return self._holds.get(DRAIN) or self._holds.get(OWNER)

    @property
    def work_running(self) -> int | None:
        """``execute_work`` requests running now (None when not counted here)."""
        with self._lock:
            return self._running if self._counted else None

    def stop(self, reason: str, hold: Hold = DRAIN) -> bool:
        """``hold`` holds the pool queue, because of ``reason``; returns whether the agent
        was accepting until now (so the caller stops consuming)."""
        with self._lock:
            was_accepting = not self._holds
            self._holds[hold] = reason
            return was_accepting

    def resume(self, hold: Hold = DRAIN) -> bool:
        """``hold`` lets go of the pool queue; returns whether the agent is accepting now
        (nothing else holds it, so the caller consumes again)."""
        with self._lock:
            self._holds.pop(hold, None)
            return not self._holds

    @contextmanager
    def running(self) -> Iterator[threading.Event]:
        """Count one running ``execute_work`` for the duration of the block; yields the
        event :meth:`hand_back` sets (the work should stop and go back to the pool)."""
        handed_back = threading.Event()
        with self._lock:
            self._running += 1
            self._handing.add(handed_back)
        try:
            yield handed_back
        finally:
            with self._lock:
                self._running -= 1
                self._handing.discard(handed_back)

    def hand_back(self) -> int:
        """Ask every running ``execute_work`` to stop and hand its work back to the pool
        queue; returns how many were asked."""
        with self._lock:
            for event in self._handing:
                event.set()
            return len(self._handing)

    def snapshot_keys(self) -> dict[str, Any]:
        """``accepting``, ``accepting_reason`` and ``work_running`` for the snapshot."""
        with self._lock:
            return {"accepting": not self._holds, "accepting_reason": self._reason(),
                    "work_running": self._running if self._counted else None}
