"""Pools as the registry sees them: which exist, and how many of their agents are online.

A pool submit publishes to a durable queue named like the pool. If no agent of that pool
is online the message waits there, possibly for ever (a typo in ``--pool`` makes a queue
nobody will ever consume). :func:`check_pool` is the guard ``chiffon submit`` runs first:
it names the pools that do exist, with their online counts, so the user sees the typo or
the stopped fleet at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from chiffon_worker.errors import RoutingError
from chiffon_worker.orchestrator.registry import AgentRecord


@dataclass(frozen=True)
class PoolCount:
    """One pool's agents in the registry: how many there are, how many are online."""

    pool: str
    online: int
    known: int

    def describe(self) -> str:
        """``desktop_pool_1 (2 online)``, or ``gpu_rigs (0 online of 1)`` when some are not."""
        if self.online == self.known:
            return f"{self.pool} ({self.online} online)"
        return f"{self.pool} ({self.online} online of {self.known})"


def pool_counts(records: Iterable[AgentRecord], now: float) -> list[PoolCount]:
    """Every pool with agents in ``records``, sorted by name, with its online count at
    ``now`` (unix seconds)."""
    online: dict[str, int] = {}
    known: dict[str, int] = {}
    for record in records:
        known[record.pool] = known.get(record.pool, 0) + 1
        is_online = record.takes_work(now)  # online, and neither drained nor refusing
        online[record.pool] = online.get(record.pool, 0) + int(is_online)
    return [PoolCount(pool, online[pool], known[pool]) for pool in sorted(known)]


def check_pool(records: Iterable[AgentRecord], pool: str, now: float) -> None:
    """Return if ``pool`` has an online agent at ``now`` (unix seconds); else raise
    RoutingError naming ``pool`` and the pools that exist with their online counts."""
    counts = pool_counts(records, now)
    if any(count.pool == pool and count.online > 0 for count in counts):
        return
    if not counts:
        raise RoutingError(f"no online agent in pool {pool}: the registry has no agents yet "
                           f"(chiffon orchestrator must be running to fill it)")
    raise RoutingError(f"no online agent in pool {pool}; pools: "
                       + ", ".join(count.describe() for count in counts))
