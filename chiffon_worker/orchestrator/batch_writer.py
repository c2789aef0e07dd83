"""Batched registry writes: rows from the judge in, one transaction per batch out.

:class:`BatchWriter` collects the :class:`~.judge.Rows` of accepted heartbeats, keeping
only the newest agent row per agent and history point per ring slot (a later heartbeat
of the same agent supersedes an earlier one not yet written). :meth:`BatchWriter.take_batch`
hands everything collected over as one :class:`Batch`; :meth:`BatchWriter.write` commits
a batch in one transaction, and may be called again with the same batch after a
:class:`~chiffon_worker.errors.RegistryError` (nothing of a failed batch is stored).
Writes are counted in :class:`.IngestStats` (batches, seconds, errors).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from chiffon_worker.errors import RegistryError
from chiffon_worker.orchestrator.ingest_counters import IngestStats
from chiffon_worker.orchestrator.judge import Outcome, Rows
from chiffon_worker.orchestrator.registry import Registry


@dataclass(frozen=True, slots=True)
class Batch:
    """Rows for one registry transaction: agent rows (one per agent) and history points."""

    agent_rows: list[dict[str, Any]]
    history_rows: list[dict[str, Any]]
    conflict_rows: list[dict[str, Any]] = field(default_factory=list)


class BatchWriter:
    """Collects rows and commits them to ``registry`` in batches (see the module docstring).

    ``stats``: where writes are counted (shared with the judge and the consumer).
    """

    def __init__(self, registry: Registry, *, stats: IngestStats | None = None) -> None:
        self.registry = registry
        self.stats = stats if stats is not None else IngestStats()
        self._agents: dict[str, dict[str, Any]] = {}
        self._history: dict[tuple[str, int], dict[str, Any]] = {}
        self._conflicts: dict[str, dict[str, Any]] = {}
        self._uncommitted = 0  # agent rows of the batch taken and not yet committed

    @property
    def pending(self) -> int:
        """Agent rows collected or taken and not yet committed."""
        return len(self._agents) + self._uncommitted

    def keep(self, outcome: Outcome) -> None:
        """Collect what a judged message writes: an accepted heartbeat's rows, a conflict."""
        if outcome.rows is not None:
            self.add(outcome.rows)
        if outcome.conflict is not None:
            self._conflicts[outcome.conflict["agent_id"]] = outcome.conflict

    def add(self, rows: Rows) -> None:
        """Collect one accepted heartbeat's rows (superseding older ones of its agent)."""
        agent_id = rows.agent["agent_id"]
        self._agents[agent_id] = rows.agent
        self._history[(agent_id, rows.history["slot"])] = rows.history

    def take_batch(self) -> Batch | None:
        """Everything collected, as one batch to write (None when nothing is).

        The writer forgets the rows: write the batch with :meth:`write`.
        """
        if not self._agents and not self._history and not self._conflicts:
            return None
        agent_rows = []
        for row in self._agents.values():
            snapshot = row["snapshot"]
            if not isinstance(snapshot, str):
                row["snapshot"] = json.dumps(snapshot, separators=(",", ":"))
            agent_rows.append(row)
        batch = Batch(agent_rows, list(self._history.values()), list(self._conflicts.values()))
        self._conflicts = {}
        self._uncommitted = len(agent_rows)
        self._agents = {}
        self._history = {}
        return batch

    def write(self, batch: Batch) -> None:
        """Commit ``batch`` in one transaction (RegistryError: nothing of it is stored)."""
        started = time.perf_counter()
        try:
            self.registry.write_batch(batch.agent_rows, batch.history_rows,
                                      batch.conflict_rows)
        except RegistryError:
            self.stats.write_errors += 1
            raise
        self.stats.write_seconds += time.perf_counter() - started
        self.stats.batches += 1
        self._uncommitted = 0
