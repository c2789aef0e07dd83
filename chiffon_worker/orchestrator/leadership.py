"""Which orchestrator of one registry follows the agents' events and re-sends drains.

Several ``chiffon orchestrator`` processes may run on one PostgreSQL registry, for high
availability and for ingest: all of them consume the shared heartbeat queue (the
registry's ingest turn orders their writes: :meth:`~.registry.Registry.ingest_turn`), and
exactly one of them, the *leader*, also follows the agents' Celery events and re-sends
missed drains; the others try every ``poll_seconds`` to take the lead. The lead is a
PostgreSQL session-level advisory lock held on a connection of its own. When the leader's
process dies its connection closes, PostgreSQL releases the lock, and another
orchestrator takes over within a poll. The dead orchestrator's unacknowledged heartbeats
are redelivered to the others and recognised (duplicates are ignored; one whose number
was counted missed fills its gap), so ``seq``, ``restarts``, ``missed`` and the history
come out as with one orchestrator.

SQLite allows one orchestrator per registry file: a second one refuses to start with
:class:`RegistryInUse`, naming the file (an exclusive ``flock`` on ``<file>.lock``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path
from typing import IO

from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from chiffon_worker.errors import ChiffonError
from chiffon_worker.orchestrator.registry import Registry

log = logging.getLogger(__name__)

#: How often a standby tries to take the lead, and how often a leader checks that its
#: lock connection still holds it (seconds).
DEFAULT_POLL_SECONDS = 0.5
CHECK_SECONDS = 2.0


class RegistryInUse(ChiffonError):
    """Another orchestrator already runs on this SQLite registry."""


class Leadership:
    """The lead of ``registry`` for ``queue`` (see the module docstring)."""

    def __init__(self, registry: Registry, queue: str, *,
                 poll_seconds: float = DEFAULT_POLL_SECONDS) -> None:
        self.registry = registry
        self.queue = queue
        self.poll_seconds = poll_seconds
        self._lock_file: IO[str] | None = None
        self._conn: Connection | None = None
        self.name = f"chiffon.leader:{registry.schema or 'public'}:{queue}"

    @property
    def shared(self) -> bool:
        """Whether several orchestrators may run on this registry (PostgreSQL)."""
        return self.registry.dialect == "postgresql"

    def acquire(self, stop: threading.Event) -> bool:
        """Take the lead, waiting as a standby while another orchestrator holds it (on
        PostgreSQL). Returns False when ``stop`` was set first. Raises RegistryInUse on a
        SQLite registry another orchestrator uses."""
        if not self.shared:
            self._lock_sqlite()
            return True
        waited = False
        while not stop.is_set():
            if self._try_pg_lock():
                if waited:
                    log.info("took the lead on registry %s (%s): following worker "
                             "events and drains", self.registry.masked_url, self.queue)
                return True
            if not waited:
                log.info("standby for the lead on registry %s (%s): another orchestrator "
                         "follows worker events and drains; this one consumes heartbeats "
                         "and takes over when it stops", self.registry.masked_url,
                         self.queue)
                waited = True
            stop.wait(self.poll_seconds)
        return False

    def holds(self) -> bool:
        """Whether the lead is still held (PostgreSQL: its connection still answers)."""
        if not self.shared:
            return self._lock_file is not None
        if self._conn is None:
            return False
        try:
            self._conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            log.error("lost the lead on registry %s: %s", self.registry.masked_url,
                      str(exc).splitlines()[0][:200])
            return False
        return True

    def release(self) -> None:
        """Give the lead up (a standby takes over)."""
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT pg_advisory_unlock_all()"))
                self._conn.close()
            except SQLAlchemyError as exc:
                log.debug("releasing the lead: %s", exc)
            self._conn = None
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file drops the flock
            self._lock_file = None

    def _try_pg_lock(self) -> bool:
        try:
            if self._conn is None:
                self._conn = self.registry.engine.connect().execution_options(
                    isolation_level="AUTOCOMMIT")
            taken = self._conn.execute(text("SELECT pg_try_advisory_lock(hashtext(:name))"),
                                       {"name": self.name}).scalar()
        except SQLAlchemyError as exc:
            log.warning("registry %s: cannot try the lead: %s", self.registry.masked_url,
                        str(exc).splitlines()[0][:200])
            if self._conn is not None:
                self._conn.invalidate()
                self._conn = None
            return False
        return bool(taken)

    def _lock_sqlite(self) -> None:
        database = make_url(self.registry.url).database or ""
        if not database or database == ":memory:":
            return  # a private in-memory registry: nobody else can open it
        path = Path(f"{database}.lock")
        handle = path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise RegistryInUse(
                f"registry {database} is in use by another chiffon orchestrator (pid "
                f"{holder}); one orchestrator per SQLite registry (use PostgreSQL, "
                f"database_url, to run several)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_file = handle
