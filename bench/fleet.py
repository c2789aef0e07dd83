"""A registry full of agents for the benchmarks that need one (``registry``, ``routing``).

``chiffon_worker`` and the test helpers are imported inside the functions that use them:
``bench/registry.py`` first puts the tree it measures (this one or a baseline's) on
``sys.path``.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chiffon_worker.orchestrator.registry import Registry

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
#: Heartbeats committed per registry transaction while filling.
FEED_BATCH = 1000


class Backend:
    """Where one registry lives: an SQLite file in a temporary directory (named with
    ``prefix``), or a PostgreSQL schema of its own; :meth:`drop` removes it."""

    def __init__(self, name: str, prefix: str) -> None:
        self.name = name
        self.schema: str | None = None
        self.workdir: str | None = None
        if name == "sqlite":
            self.workdir = tempfile.mkdtemp(prefix=prefix)
            self.url = f"sqlite:///{Path(self.workdir) / 'registry.sqlite3'}"
        elif name == "postgresql":
            self.schema = f"chiffon_bench_{uuid.uuid4().hex[:8]}"
            self.url = POSTGRES
        else:
            raise SystemExit(f"unknown backend {name!r} (sqlite, postgresql)")

    @property
    def process_url(self) -> str:
        """The URL a ``chiffon`` process is given (the schema first on the search path)."""
        if self.schema is None:
            return self.url
        return f"{self.url}?options={urllib.parse.quote(f'-csearch_path={self.schema}')}"

    def open(self) -> Registry:
        from chiffon_worker.orchestrator.registry import Registry

        return Registry(self.url, schema=self.schema)

    def drop(self) -> None:
        from sqlalchemy import create_engine, text

        if self.schema:
            engine = create_engine(POSTGRES)
            with engine.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
            engine.dispose()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def fill(registry: Registry, agents: int, now: float, seed: int) -> float:
    """Store ``agents`` random agents (``random_snapshot`` seeded with ``seed``), all heard
    from at ``now``; returns the seconds it took."""
    from tests.orchestrator.feeding import Feeder
    from tests.orchestrator.snapshots import random_snapshot

    rng = random.Random(seed)
    started = time.perf_counter()
    feeder = Feeder(registry)
    for i in range(agents):
        snap = random_snapshot(rng, f"bench-agent-{i:05d}", 1)
        snap["collected_at"] = now
        outcome = feeder.snapshot(snap, received_at=now)
        if outcome.kind != "accepted":
            raise SystemExit(f"snapshot {i} was not accepted: {outcome}")
        if (i + 1) % FEED_BATCH == 0:
            feeder.commit()
    feeder.commit()
    stored = len(registry.agent_ids())
    if stored != agents:
        raise SystemExit(f"{stored} agents stored, expected {agents}")
    return time.perf_counter() - started
