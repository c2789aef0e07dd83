"""The JSON view of one agent in the registry (``chiffon status --json``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chiffon_worker.signing import SIGNATURE_KEY

if TYPE_CHECKING:
    from chiffon_worker.orchestrator.registry import AgentRecord


def status_object(record: AgentRecord, now: float) -> dict[str, Any]:
    """One agent for ``chiffon status --json``: registry fields, then its newest snapshot's
    keys (times in unix seconds, ``age_seconds`` since the newest heartbeat was received).

    ``liveness`` is ``online``, ``stopped``, ``lost`` or ``conflict``; ``state`` its coarse
    form, ``online`` (alive) or ``offline``, as always; ``last_event_at`` the receipt time of
    the newest Celery worker event (null until one was seen); ``conflict`` the newest
    heartbeat of a second process claiming the id (null if none ever did); ``drain``
    ``draining`` or ``drained`` once an operator drained the agent (null otherwise), and
    ``drain_requested_at`` when (unix seconds)."""
    obj: dict[str, Any] = {
        "agent_id": record.agent_id,
        "hostname": record.hostname,
        "pool": record.pool,
        "state": record.state(now),
        "liveness": record.liveness(now),
        "age_seconds": round(record.age_seconds(now), 3),
        "boot_id": record.boot_id,
        "seq": record.seq,
        "restarts": record.restarts,
        "missed": record.missed,
        "first_seen": record.first_seen,
        "last_seen": record.last_seen,
        "clock_skew_seconds": record.clock_skew_seconds,
        "last_event_at": record.signs.last_event_at if record.signs else None,
        "conflict": None if record.conflict is None else {
            "hostname": record.conflict.hostname, "boot_id": record.conflict.boot_id,
            "seen_at": record.conflict.seen_at, "current": record.conflicting(now)},
        "drain": record.drain_state(now),
        "drain_requested_at": record.drain_requested_at,
    }
    for key, value in record.snapshot.items():
        if key not in obj and key != SIGNATURE_KEY:
            obj[key] = value
    return obj
