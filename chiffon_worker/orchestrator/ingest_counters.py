"""Counters of the heartbeat consumer (judge, batch writer, broker loop), read by the
Prometheus exporter.

One thread (the consumer) writes; the exporter reads copies. Plain integers under the
GIL are enough: a scrape may see a value one message old, never a torn one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

#: The ignore reason of a heartbeat from a second live process claiming an agent's id.
CONFLICT = "conflict"


@dataclass
class IngestStats:
    """Running totals since the orchestrator started (counts; seconds where named)."""

    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    ignored: Counter[str] = field(default_factory=Counter)
    restarts: int = 0
    gaps: int = 0
    missed: int = 0
    clock_skewed: int = 0
    batches: int = 0
    write_seconds: float = 0.0
    write_errors: int = 0
    connection_losses: int = 0
    #: accepted heartbeats that came after a newer one of their agent and filled its gap
    late: int = 0

    def copy(self) -> IngestStats:
        """An independent copy (for a scrape)."""
        return IngestStats(self.accepted, Counter(self.rejected), Counter(self.ignored),
                           self.restarts, self.gaps, self.missed, self.clock_skewed,
                           self.batches, self.write_seconds, self.write_errors,
                           self.connection_losses, self.late)

    def restore(self, earlier: IngestStats) -> None:
        """Take every count back to ``earlier`` (a :meth:`copy`), undoing what came after."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(earlier.copy(), name))

    @property
    def conflicts(self) -> int:
        """Heartbeats from a second live process claiming an agent's id (ignored ones)."""
        return self.ignored[CONFLICT]

    @property
    def rejected_total(self) -> int:
        """Messages rejected for any reason."""
        return sum(self.rejected.values())

    @property
    def ignored_total(self) -> int:
        """Valid heartbeats that did not update the registry (duplicates, stale, expired)."""
        return sum(self.ignored.values())
