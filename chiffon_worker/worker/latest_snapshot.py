"""The agent's latest snapshot: the one its last heartbeat carried, kept for other views.

Every snapshot the heartbeat sender takes (beat's, and the sleep announcer's) is
recorded here before it is signed and published, so a view of the agent's capacity (the
``stats`` reply Flower shows, :mod:`.flower_stats`) reads what the orchestrator was
told instead of probing the machine again. :func:`recent_snapshot` hands back the latest
one while it is recent, else takes a fresh one (``seq`` 0: an ad-hoc view, not a
heartbeat) and keeps that instead, so a burst of views costs one snapshot at most.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chiffon_worker.process_local import ProcessLocal

#: A kept snapshot is recent while it is younger than this many heartbeat intervals.
RECENT_INTERVALS = 2.0


@dataclass(frozen=True)
class KeptSnapshot:
    """A snapshot and when it was kept (``time.monotonic()`` seconds)."""

    snapshot: dict[str, Any]
    kept_at: float

    def age_seconds(self, now: float | None = None) -> float:
        """Seconds since it was kept (``now``: a ``time.monotonic()`` reading)."""
        return max(0.0, (time.monotonic() if now is None else now) - self.kept_at)


class LatestSnapshot:
    """The newest snapshot of this process (thread-safe: beat records, the consumer reads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: KeptSnapshot | None = None

    def record(self, snapshot: dict[str, Any], now: float | None = None) -> None:
        """Keep ``snapshot`` as the latest (``now``: a ``time.monotonic()`` reading)."""
        kept = KeptSnapshot(snapshot, time.monotonic() if now is None else now)
        with self._lock:
            self._kept = kept

    def latest(self) -> KeptSnapshot | None:
        """The latest kept snapshot, however old, or None before the first."""
        with self._lock:
            return self._kept

    def recent(self, max_age_seconds: float,
               take_snapshot: Callable[[], dict[str, Any]]) -> KeptSnapshot:
        """The latest snapshot if it is at most ``max_age_seconds`` old, else one taken
        now by ``take_snapshot()`` (and kept, so the next call reuses it)."""
        kept = self.latest()
        if kept is not None and kept.age_seconds() <= max_age_seconds:
            return kept
        fresh = KeptSnapshot(take_snapshot(), time.monotonic())
        with self._lock:
            if self._kept is None or self._kept.kept_at < fresh.kept_at:
                self._kept = fresh
        return fresh


_latest: ProcessLocal[LatestSnapshot] = ProcessLocal(LatestSnapshot)


def latest_snapshot() -> LatestSnapshot:
    """This process's latest-snapshot holder (a forked child starts with none)."""
    return _latest.get()


def record_snapshot(snapshot: dict[str, Any]) -> None:
    """Keep ``snapshot`` as this process's latest (the heartbeat sender calls this)."""
    latest_snapshot().record(snapshot)


def recent_snapshot(heartbeat_interval_seconds: float,
                    take_snapshot: Callable[[], dict[str, Any]]) -> KeptSnapshot:
    """The latest snapshot while it is younger than ``RECENT_INTERVALS`` heartbeat
    intervals (seconds), else a fresh one from ``take_snapshot()``."""
    return latest_snapshot().recent(RECENT_INTERVALS * heartbeat_interval_seconds,
                                    take_snapshot)
