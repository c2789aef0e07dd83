"""Reservations: what placed work holds against its agent, and what is left to promise.

A capacity placement (``chiffon submit --needs``) reserves what it asked for (VRAM, cores,
memory, in the needs' units) against the chosen agent, in the same registry transaction
that chose it (``Registry.placement``), so submitters in other threads, processes or
hosts see it at once. What an agent can still be promised for need ``k`` is::

    min(free_k - unreflected_k, total_k - promised_k)

* ``free_k``: the agent's newest heartbeat figure (``gpu_vram_available_gb``,
  ``cpu_cores_available``, ``memory_available_gb``): it already shows what anything
  else on the machine uses (a game, work that was placed earlier and runs).
* ``unreflected_k``: reservations the heartbeat cannot show yet: work placed but not
  started, or started less than one heartbeat interval before the newest heartbeat
  was collected.
* ``total_k - promised_k``: the agent's whole capacity (``gpu_vram_total_gb``,
  ``cpu_cores_physical``, ``memory_total_gb``) less every active reservation, as
  Kubernetes counts requests against allocatable: work that has not allocated yet
  still has its share, so ten 8 GiB submits at once never land on one 24 GiB card.

A reservation is active from placement until its work ends (the agent's task events,
or the submitter receiving the result) or until ``expires_at`` (placement time plus
``reservation_ttl_seconds``), so a lost submitter or a missed event cannot pin capacity
forever. Units: the needs' units; times in unix seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

WorkState = Literal["placed", "running", "succeeded", "failed", "revoked", "released",
                    "expired"]
#: States in which work still holds what it reserved.
ACTIVE_STATES: tuple[WorkState, ...] = ("placed", "running")
#: What a task event says about the work (Celery event type -> state).
EVENT_STATES: dict[str, WorkState] = {
    "task-received": "placed",
    "task-started": "running",
    "task-succeeded": "succeeded",
    "task-failed": "failed",
    "task-revoked": "revoked",
    "task-rejected": "failed",
}


@dataclass(frozen=True)
class Reservation:
    """One piece of placed (or seen running) work and what it holds."""

    work_id: str
    agent_id: str
    pool: str
    work_type: str
    needs: Mapping[str, float]
    state: WorkState
    placed_at: float
    expires_at: float
    submitter: str
    started_at: float | None = None
    ended_at: float | None = None

    def active(self, now: float) -> bool:
        """Whether it still holds capacity at ``now``."""
        return self.state in ACTIVE_STATES and self.ended_at is None and now < self.expires_at

    def shown_state(self, now: float) -> str:
        """The state for display: an active state past its lifetime reads ``expired``."""
        if self.state in ACTIVE_STATES and now >= self.expires_at:
            return "expired"
        return self.state

    def reflected(self, collected_at: float | None, interval: float) -> bool:
        """Whether a heartbeat collected at ``collected_at`` already shows this work's use:
        it started at least one heartbeat ``interval`` before."""
        return (self.started_at is not None and collected_at is not None
                and collected_at >= self.started_at + interval)


@dataclass
class Held:
    """What one agent's active reservations hold, per need key."""

    promised: dict[str, float] = field(default_factory=dict)
    unreflected: dict[str, float] = field(default_factory=dict)
    count: int = 0


@dataclass(frozen=True)
class HeartbeatTiming:
    """When an agent's newest heartbeat was collected, and its interval (seconds)."""

    collected_at: float
    interval: float


def held_by_agent(reservations: Iterable[Reservation], timing: Mapping[str, HeartbeatTiming],
                  now: float) -> dict[str, Held]:
    """Active reservations summed per agent (``timing``: each agent's newest heartbeat)."""
    held: dict[str, Held] = {}
    for reservation in reservations:
        if not reservation.active(now):
            continue
        entry = held.setdefault(reservation.agent_id, Held())
        entry.count += 1
        beat = timing.get(reservation.agent_id)
        reflected = beat is not None and reservation.reflected(beat.collected_at, beat.interval)
        for key, amount in reservation.needs.items():
            entry.promised[key] = entry.promised.get(key, 0.0) + amount
            if not reflected:
                entry.unreflected[key] = entry.unreflected.get(key, 0.0) + amount
    return held


def promisable(free: float, total: float, held: Held | None, key: str) -> float:
    """What can still be promised of need ``key`` (see the module docstring); never
    negative."""
    if held is None:
        return free
    return max(0.0, min(free - held.unreflected.get(key, 0.0),
                        total - held.promised.get(key, 0.0)))
