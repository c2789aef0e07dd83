"""``DrainEnforcer``: agents come to obey the registry's drain requests, even if they were
away when the operator asked.

``chiffon drain`` records the request and tells the agent once; an agent that was offline
then never heard it. Its heartbeats tell: an alive agent with a drain request whose newest
heartbeat says ``accepting: true`` gets ``chiffon_drain`` again; an alive agent without
one whose heartbeat says it is not accepting because it was drained (``accepting_reason``
``drained``: an undrain it missed) gets ``chiffon_undrain``. Another reason (a worker
started with ``-Q`` leaving the pool out) is the operator's choice and left alone. Agents
that are not alive are skipped (nothing reaches them). Each agent is told at most once per
``resend_seconds`` (its next heartbeat shows whether it obeyed).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, Protocol

from chiffon_worker.errors import RegistryError
from chiffon_worker.wire import DRAINED_REASON

if TYPE_CHECKING:
    from chiffon_worker.orchestrator.agent_control import ControlAnswer
    from chiffon_worker.orchestrator.registry import AgentRecord, Registry

log = logging.getLogger(__name__)

#: Shortest time between two commands to one agent (seconds).
DEFAULT_RESEND_SECONDS = 30.0
#: How often :meth:`DrainEnforcer.follow` reads the registry (seconds).
DEFAULT_PERIOD_SECONDS = 5.0
#: Who the agent's drain mark says asked, when the orchestrator re-sends a drain.
ENFORCER_NAME = "chiffon orchestrator (drain re-sent)"

Command = Literal["drain", "undrain"]


class Control(Protocol):
    """What the enforcer sends through (:class:`~.agent_control.AgentControl`)."""

    def drain(self, record: AgentRecord, *, by: str, at: float) -> ControlAnswer: ...

    def undrain(self, record: AgentRecord) -> ControlAnswer: ...


def needed_command(record: AgentRecord, now: float) -> Command | None:
    """What ``record``'s agent must be told so that it matches the registry, if anything."""
    if record.state(now) != "online":
        return None
    accepting = record.metrics.get("accepting")
    if record.drain_requested_at is not None:
        return "drain" if accepting is True else None
    if accepting is False and record.metrics.get("accepting_reason") == DRAINED_REASON:
        return "undrain"
    return None


class DrainEnforcer:
    """Sends the drain or undrain an agent missed (see the module docstring)."""

    def __init__(self, control: Control, *,
                 resend_seconds: float = DEFAULT_RESEND_SECONDS) -> None:
        self.control = control
        self.resend_seconds = resend_seconds
        self._sent: dict[str, tuple[Command, float]] = {}  # agent id -> (command, when)

    def enforce(self, records: Iterable[AgentRecord], now: float) -> list[tuple[str, Command]]:
        """Tell every agent of ``records`` that needs it (at most once per
        ``resend_seconds`` each; ``now`` in unix seconds); returns (agent id, command)
        for each command sent."""
        sent: list[tuple[str, Command]] = []
        pending: dict[str, tuple[Command, float]] = {}
        for record in records:
            command = needed_command(record, now)
            if command is None:
                continue
            last = self._sent.get(record.agent_id)
            if last is not None and last[0] == command and now - last[1] < self.resend_seconds:
                pending[record.agent_id] = last
                continue
            self._send(record, command)
            pending[record.agent_id] = (command, now)
            sent.append((record.agent_id, command))
        self._sent = pending  # agents that obey are forgotten
        return sent

    def _send(self, record: AgentRecord, command: Command) -> None:
        if command == "drain":
            at = record.drain_requested_at if record.drain_requested_at is not None else 0.0
            answer = self.control.drain(record, by=ENFORCER_NAME, at=at)
            why = "it has a drain request but its heartbeat says it takes pool work"
        else:
            answer = self.control.undrain(record)
            why = "it has no drain request but its heartbeat says it is drained"
        if answer.answered:
            log.info("told agent %s to %s: %s", record.agent_id, command, why)
        else:
            log.warning("agent %s must %s (%s) but %s", record.agent_id, command, why,
                        answer.error or answer.refusal or "it did not answer")

    def follow(self, registry: Registry, stop: threading.Event,
               period_seconds: float = DEFAULT_PERIOD_SECONDS) -> None:
        """Enforce every ``period_seconds`` from ``registry`` until ``stop`` is set (the
        body of a thread); a registry that cannot be read is retried next period."""
        while not stop.wait(period_seconds):
            try:
                records = registry.agents()
            except RegistryError as exc:
                log.warning("drain enforcer: %s", exc)
                continue
            self.enforce(records, time.time())
