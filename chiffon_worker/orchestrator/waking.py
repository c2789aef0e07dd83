"""Waking a sleeping agent for work that fits nowhere awake (``chiffon submit --wake``).

:func:`sleeper_for` picks, among the agents whose newest heartbeat announced sleep
(liveness ``asleep``) and told their MAC address, the one with the most headroom for the
needs by the figures it reported before it slept (an agent's reservations end with its
work, and a sleeping one runs none). :func:`wake_agent` sends it the Wake-on-LAN magic
packet. The router then tries the placement again until the agent heartbeats, awake, or
the time given is up.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from chiffon_worker.orchestrator.registry import AgentRecord
from chiffon_worker.orchestrator.routing import available
from chiffon_worker.wake import send_wake

log = logging.getLogger(__name__)


def sleeper_for(records: Iterable[AgentRecord], needs: Mapping[str, float], *,
                pool: str | None, now: float) -> AgentRecord | None:
    """The sleeping agent (of ``pool``) with a known MAC whose last report meets
    ``needs`` with the most headroom; None when none does."""
    fitting = [(headroom, record.agent_id, record) for record in records
               if (pool is None or record.pool == pool)
               and record.liveness(now) == "asleep" and record.metrics.get("mac_address")
               and (headroom := fits_by_report(record, needs)) is not None]
    return max(fitting, key=lambda item: (item[0], item[1]))[2] if fitting else None


def fits_by_report(record: AgentRecord, needs: Mapping[str, float]) -> float | None:
    """How many times over ``record``'s last report meets ``needs`` (the smallest ratio
    of what it had to what is asked; its cores free without needs); None when it falls
    short of one or does not know it."""
    ratios = []
    for key, need in needs.items():
        if need <= 0:
            continue
        have = available(record, key)
        if have is None or have < need:
            return None
        ratios.append(have / need)
    return min(ratios) if ratios else record.number("cpu_cores_available")


def wake_agent(record: AgentRecord, broadcast_address: str, port: int) -> str:
    """Send ``record``'s machine the magic packet; returns its MAC."""
    mac = str(record.metrics["mac_address"])
    send_wake(mac, broadcast_address, port)
    log.info("woke %s (%s, %s) through %s:%d", record.agent_id, record.hostname, mac,
             broadcast_address, port)
    return mac
