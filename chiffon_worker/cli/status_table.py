"""The text view of ``chiffon status``: one table row per agent and a summary line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chiffon_worker.cli.output import format_age, render_table
from chiffon_worker.snapshot import FIELDS_BY_NAME

if TYPE_CHECKING:
    from chiffon_worker.orchestrator.registry import AgentRecord

NO_AGENTS = "no agents in the registry yet"


@dataclass(frozen=True)
class MetricColumn:
    """A column showing one stored snapshot field, or ``free/total`` of two.

    The header is ``title`` and the fields' unit (from the snapshot declaration);
    ``digits``: decimals shown; ``gpu_only``: ``-`` for an agent without a GPU.
    """

    title: str
    field: str
    total: str | None = None
    digits: int = 1
    gpu_only: bool = False

    @property
    def header(self) -> str:
        unit = FIELDS_BY_NAME[self.field].unit
        return f"{self.title} {unit}" if unit else self.title

    def cell(self, record: AgentRecord) -> str:
        if self.gpu_only and record.gpu_type == "none":
            return "-"
        value = record.metrics[self.field]
        if not isinstance(value, int | float):
            return str(value)
        shown = f"{value:.{self.digits}f}"
        if self.total is None:
            return shown
        total = record.metrics[self.total]
        return f"{shown}/{total}" if isinstance(total, int) else f"{shown}/{total:.{self.digits}f}"


#: The capacity columns, after agent, host, pool, state and age.
METRIC_COLUMNS = (
    MetricColumn("CORES", "cpu_cores_available", "cpu_cores_physical"),
    MetricColumn("LOAD", "cpu_load_1min", digits=2),
    MetricColumn("MEM", "memory_available_gb", "memory_total_gb"),
    MetricColumn("GPU", "gpu_type", gpu_only=True),
    MetricColumn("VRAM", "gpu_vram_available_gb", "gpu_vram_total_gb", gpu_only=True),
)
TABLE_HEADERS = ("AGENT", "HOST", "POOL", "STATE", "AGE",
                 *(column.header for column in METRIC_COLUMNS))


def status_row(record: AgentRecord, now: float) -> list[str]:
    """One table row (see ``TABLE_HEADERS``)."""
    state: str = record.liveness(now)
    if state == "conflict" and record.conflict is not None:
        state = f"conflict (also {record.conflict.hostname})"
    return [record.agent_id, record.hostname, record.pool, state,
            format_age(record.age_seconds(now)),
            *(column.cell(record) for column in METRIC_COLUMNS)]


def render_status(records: Sequence[AgentRecord], now: float) -> str:
    """The ``chiffon status`` table with a one-line summary."""
    if not records:
        return NO_AGENTS
    online = sum(1 for r in records if r.liveness(now) == "online")
    table = render_table(TABLE_HEADERS, (status_row(r, now) for r in records))
    return f"{table}\n\n{online} of {len(records)} agents online"
