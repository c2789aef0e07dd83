"""Feeding heartbeats into a registry without a broker: the judge and the batch writer
wired as the consumer wires them (one shared ``IngestStats``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from chiffon_worker.orchestrator.batch_writer import BatchWriter
from chiffon_worker.orchestrator.heartbeat_consumer import HeartbeatConsumer
from chiffon_worker.orchestrator.ingest_counters import IngestStats
from chiffon_worker.orchestrator.judge import HeartbeatJudge, Outcome
from chiffon_worker.orchestrator.registry import Registry


class Feeder:
    """A judge seeded from ``registry`` and a writer into it; :meth:`commit` writes."""

    def __init__(self, registry: Registry, *, secret: str = "") -> None:
        self.registry = registry
        self.stats = IngestStats()
        self.judge = HeartbeatJudge(registry.agents(), history_points=registry.history_points,
                                    secret=secret, stats=self.stats)
        self.writer = BatchWriter(registry, stats=self.stats)

    def snapshot(self, snap: Mapping[str, Any], *, received_at: float, **options: Any
                 ) -> Outcome:
        """Judge one snapshot; an accepted one's rows wait for :meth:`commit`."""
        return self._keep(self.judge.judge_snapshot(snap, received_at=received_at, **options))

    def message(self, body: bytes | str, headers: Mapping[str, Any] | None,
                content_type: str | None, content_encoding: str | None = None, *,
                received_at: float, **options: Any) -> Outcome:
        """Judge one raw message; an accepted one's rows wait for :meth:`commit`."""
        return self._keep(self.judge.judge_message(body, headers, content_type,
                                                   content_encoding, received_at=received_at,
                                                   **options))

    def _keep(self, outcome: Outcome) -> Outcome:
        self.writer.keep(outcome)
        return outcome

    def commit(self) -> int:
        """Write everything accepted so far in one batch; returns the agent rows written."""
        batch = self.writer.take_batch()
        if batch is None:
            return 0
        self.writer.write(batch)
        return len(batch.agent_rows)


def feed(registry: Registry, *snapshots: Mapping[str, Any], start: float, step: float = 30.0
         ) -> Feeder:
    """Judge ``snapshots`` received ``step`` seconds apart from ``start``; one batch."""
    feeder = Feeder(registry)
    for n, snap in enumerate(snapshots):
        feeder.snapshot(snap, received_at=start + n * step)
    feeder.commit()
    return feeder


def consumer(broker_url: str, registry: Registry, *, secret: str = "", **options: Any
             ) -> HeartbeatConsumer:
    """A consumer on ``registry`` with a fresh judge and writer."""
    feeder = Feeder(registry, secret=secret)
    return HeartbeatConsumer(broker_url, feeder.judge, feeder.writer, **options)
