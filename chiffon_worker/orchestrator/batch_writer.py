"""Batched registry writes: rows from the judge in, one transaction per batch out.

:class:`BatchWriter` collects the :class:`~.judge.Rows` of accepted heartbeats, keeping
only the newest agent row per agent and history point per ring slot (a later heartbeat
of the same agent supersedes an earlier one not yet written). :meth:`BatchWriter.take_batch`
hands everything collected over as one :class:`Batch`; :meth:`BatchWriter.write` commits
a batch in one transaction, and may be called again with the same batch after a
:class:`~chiffon_worker.errors.RegistryError` (nothing of a failed batch is stored).
Writes are counted in :class:`.IngestStats` (batches, seconds, errors).

The consumer uses :meth:`BatchWriter.commit` instead: it sequences checked heartbeats
(:meth:`~.judge.HeartbeatJudge.sequence`) inside the registry's ingest turn and writes
their rows there, so several orchestrators on one registry decide each agent's order in
the database: when another one wrote since this writer's last turn, the judge first
reloads the batch's agents from the registry.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from chiffon_worker.errors import RegistryError
from chiffon_worker.orchestrator.ingest_counters import IngestStats
from chiffon_worker.orchestrator.judge import LATE_COLUMNS, Checked, HeartbeatJudge, Outcome, Rows
from chiffon_worker.orchestrator.registry import Registry


@dataclass(frozen=True, slots=True)
class Batch:
    """Rows for one registry transaction: agent rows (one per agent) and history points."""

    agent_rows: list[dict[str, Any]]
    history_rows: list[dict[str, Any]]
    conflict_rows: list[dict[str, Any]] = field(default_factory=list)
    #: late heartbeats' updates of agents without a row in ``agent_rows``
    late_rows: list[dict[str, Any]] = field(default_factory=list)
    #: agents of ``agent_rows`` whose row the registry holds already (``Rows.known`` for
    #: every heartbeat of theirs in the batch: a new agent's later heartbeats in the
    #: same batch are not, as its row is not stored yet)
    stored: frozenset[str] = frozenset()


class BatchWriter:
    """Collects rows and commits them to ``registry`` in batches (see the module docstring).

    ``stats``: where writes are counted (shared with the judge and the consumer).
    """

    def __init__(self, registry: Registry, *, stats: IngestStats | None = None,
                 name: str = "") -> None:
        self.registry = registry
        self.stats = stats if stats is not None else IngestStats()
        #: who writes, in the registry's ingest turns (host and pid by default)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        #: the ingest generation of this writer's last committed turn (None: none yet, or
        #: the last one failed: the judge's memory may be ahead of the registry)
        self._generation: int | None = None
        self._agents: dict[str, dict[str, Any]] = {}
        self._late: dict[str, dict[str, Any]] = {}
        self._history: dict[tuple[str, int], dict[str, Any]] = {}
        self._conflicts: dict[str, dict[str, Any]] = {}
        self._stored: set[str] = set()
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
        if not rows.late:
            if rows.known and (agent_id in self._stored or agent_id not in self._agents):
                self._stored.add(agent_id)
            else:
                self._stored.discard(agent_id)
            self._agents[agent_id] = rows.agent
            self._late.pop(agent_id, None)
        elif agent_id in self._agents:
            self._agents[agent_id].update({name: rows.agent[name] for name in LATE_COLUMNS})
        else:
            self._late[agent_id] = rows.agent
        self._history[(agent_id, rows.history["slot"])] = rows.history

    def take_batch(self) -> Batch | None:
        """Everything collected, as one batch to write (None when nothing is).

        The writer forgets the rows: write the batch with :meth:`write`.
        """
        if not self._agents and not self._history and not self._conflicts and not self._late:
            return None
        agent_rows = []
        for row in self._agents.values():
            snapshot = row["snapshot"]
            if not isinstance(snapshot, str):
                row["snapshot"] = json.dumps(snapshot, separators=(",", ":"))
            agent_rows.append(row)
        batch = Batch(agent_rows, list(self._history.values()), list(self._conflicts.values()),
                      list(self._late.values()), frozenset(self._stored))
        self._stored = set()
        self._conflicts = {}
        self._late = {}
        self._uncommitted = len(agent_rows)
        self._agents = {}
        self._history = {}
        return batch

    def write(self, batch: Batch) -> None:
        """Commit ``batch`` in one transaction (RegistryError: nothing of it is stored)."""
        started = time.perf_counter()
        try:
            self.registry.write_batch(batch.agent_rows, batch.history_rows,
                                      batch.conflict_rows, batch.late_rows,
                                      stored=batch.stored)
        except RegistryError:
            self.stats.write_errors += 1
            raise
        self.stats.write_seconds += time.perf_counter() - started
        self.stats.batches += 1
        self._uncommitted = 0

    def commit(self, held: Sequence[Checked], judge: HeartbeatJudge) -> None:
        """Sequence ``held`` (in arrival order) with ``judge`` inside the registry's ingest
        turn and commit their rows in it, with anything collected before.

        RegistryError: nothing of it is stored, the counts of the sequencing are undone,
        and the next call reloads the judge's memory from the registry: call again with
        the same ``held``.
        """
        if not held and not self.pending:
            return
        started = time.perf_counter()
        counted = self.stats.copy()
        try:
            with self.registry.ingest_turn(self.name) as turn:
                ids = {checked.agent_id for checked in held}
                if self._generation is None or turn.generation != self._generation + 1:
                    # another orchestrator (or a forget) wrote since our last turn
                    judge.reload(turn.agents(ids))
                else:  # only what the judge never saw may be stored already
                    judge.remember(turn.agents(judge.unknown(ids)))
                for checked in held:
                    self.keep(judge.sequence(checked))
                batch = self.take_batch()
                if batch is not None:
                    turn.write(batch.agent_rows, batch.history_rows, batch.conflict_rows,
                               batch.late_rows, stored=batch.stored)
        except RegistryError:
            self._generation = None
            self.take_batch()  # made again from ``held`` by the next call
            self._uncommitted = 0
            self.stats.restore(counted)
            self.stats.write_errors += 1
            raise
        self._generation = turn.generation
        self.stats.write_seconds += time.perf_counter() - started
        self.stats.batches += 1
        self._uncommitted = 0
