"""The text view of ``chiffon work``: one row per piece of placed or running work."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from chiffon_worker.cli.output import format_age, render_table

if TYPE_CHECKING:
    from chiffon_worker.orchestrator.reservations import Reservation

NO_WORK = "no work placed or running"
WORK_HEADERS = ("WORK", "TYPE", "AGENT", "HOST", "HOLDS", "AGE", "STATE")
#: How each need is written in the HOLDS column, by need key.
NEED_LABELS = {"gpu_vram_gb": "GiB VRAM", "cores": "cores", "memory_gb": "GiB mem"}


def holds(needs: Mapping[str, float]) -> str:
    """``8 GiB VRAM, 2 cores``; ``-`` for work that holds nothing (routed by pool)."""
    if not needs:
        return "-"
    return ", ".join(f"{amount:g} {NEED_LABELS.get(key, key)}" for key, amount in needs.items())


def work_row(work: Reservation, hostnames: Mapping[str, str], now: float) -> list[str]:
    """One table row (see ``WORK_HEADERS``)."""
    return [work.work_id, work.work_type or "-", work.agent_id,
            hostnames.get(work.agent_id, "?"), holds(work.needs),
            format_age(now - work.placed_at), work.shown_state(now)]


def render_work(work: Sequence[Reservation], hostnames: Mapping[str, str], now: float) -> str:
    """The ``chiffon work`` table."""
    if not work:
        return NO_WORK
    return render_table(WORK_HEADERS, (work_row(w, hostnames, now) for w in work))


def work_object(work: Reservation, now: float) -> dict[str, Any]:
    """One piece of work for ``chiffon work --json`` (times in unix seconds)."""
    return {"work_id": work.work_id, "work_type": work.work_type, "agent_id": work.agent_id,
            "pool": work.pool, "holds": dict(work.needs), "state": work.shown_state(now),
            "placed_at": work.placed_at, "started_at": work.started_at,
            "ended_at": work.ended_at, "expires_at": work.expires_at,
            "submitter": work.submitter}
