"""The text view of ``chiffon status``: one table row per agent and a summary line."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from chiffon_worker.cli.output import format_age, render_table

if TYPE_CHECKING:
    from chiffon_worker.orchestrator.registry import AgentRecord

TABLE_HEADERS = ("AGENT", "HOST", "POOL", "STATE", "AGE", "CORES", "LOAD", "MEM GiB", "GPU",
                 "VRAM GiB")

NO_AGENTS = "no agents in the registry yet"


def _pair(available: float, total: float) -> str:
    return f"{available:.1f}/{total:.1f}"


def status_row(record: AgentRecord, now: float) -> list[str]:
    """One table row (see ``TABLE_HEADERS``)."""
    has_gpu = record.gpu_type != "none"
    return [
        record.agent_id, record.hostname, record.pool, record.state(now),
        format_age(record.age_seconds(now)),
        f"{record.cpu_cores_available:.1f}/{record.cpu_cores_physical}",
        f"{record.cpu_load_1min:.2f}",
        _pair(record.memory_available_gb, record.memory_total_gb),
        record.gpu_type if has_gpu else "-",
        _pair(record.gpu_vram_available_gb, record.gpu_vram_total_gb) if has_gpu else "-",
    ]


def render_status(records: Sequence[AgentRecord], now: float) -> str:
    """The ``chiffon status`` table with a one-line summary."""
    if not records:
        return NO_AGENTS
    online = sum(1 for r in records if r.state(now) == "online")
    table = render_table(TABLE_HEADERS, (status_row(r, now) for r in records))
    return f"{table}\n\n{online} of {len(records)} agents online"
