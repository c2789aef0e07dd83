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
        if self.field == "gpu_vram_available_gb" and record.metrics.get("gpu_vram_known") is False:
            shown = "?"  # the agent does not know: not zero
        if self.total is None:
            return shown
        total = record.metrics[self.total]
        return f"{shown}/{total}" if isinstance(total, int) else f"{shown}/{total:.{self.digits}f}"


@dataclass(frozen=True)
class GpuColumn:
    """The GPU vendor, with the worst GPU health when it is not ``ok``
    (``nvidia unhealthy``)."""

    header: str = "GPU"
    field: str = "gpu_health"
    total: str | None = None

    def cell(self, record: AgentRecord) -> str:
        if record.gpu_type == "none":
            return "-"
        health = record.metrics.get("gpu_health")
        return record.gpu_type if health in (None, "ok", "none") \
            else f"{record.gpu_type} {health}"


@dataclass(frozen=True)
class ForeignColumn:
    """GPU processes that are not the agent's work, with the VRAM they hold:
    ``2 (5.1 GiB)``; ``0``; ``-`` where the agent does not list GPU processes."""

    header: str = "FOREIGN"
    field: str = "gpu_foreign_processes"
    total: str | None = None

    def cell(self, record: AgentRecord) -> str:
        count = record.metrics.get("gpu_foreign_processes")
        if count is None or record.gpu_type == "none":
            return "-"
        memory = record.metrics.get("gpu_foreign_memory_gb")
        if not count or not memory:
            return str(count)
        return f"{count} ({memory:.1f}{FIELDS_BY_NAME['gpu_foreign_memory_gb'].unit_suffix})"


#: The capacity columns, after agent, host, pool, state and age.
METRIC_COLUMNS: tuple[MetricColumn | GpuColumn | ForeignColumn, ...] = (
    MetricColumn("CORES", "cpu_cores_available", "cpu_cores_physical"),
    MetricColumn("LOAD", "cpu_load_1min", digits=2),
    MetricColumn("MEM", "memory_available_gb", "memory_total_gb"),
    GpuColumn(),
    MetricColumn("VRAM", "gpu_vram_available_gb", "gpu_vram_total_gb", gpu_only=True),
    ForeignColumn(),
)
TABLE_HEADERS = ("AGENT", "HOST", "POOL", "STATE", "AGE",
                 *(column.header for column in METRIC_COLUMNS))


def status_row(record: AgentRecord, now: float) -> list[str]:
    """One table row (see ``TABLE_HEADERS``). STATE is the liveness, except that an online
    agent with a drain request shows ``draining`` or ``drained``, and one that takes no
    pool work for another reason shows it (the owner rules: ``owner-busy (input 12 s
    ago)``)."""
    state: str = record.liveness(now)
    if state == "conflict" and record.conflict is not None:
        state = f"conflict (also {record.conflict.hostname})"
    elif state == "online":
        state = record.drain_state(now) or state
        if state == "online" and record.metrics.get("accepting") is False:
            state = record.metrics.get("accepting_reason") or "not accepting"
    return [record.agent_id, record.hostname, record.pool, state,
            format_age(record.age_seconds(now)),
            *(column.cell(record) for column in METRIC_COLUMNS)]


#: Table width ``chiffon status`` keeps to without ``--wide`` (characters).
NARROW_WIDTH = 80
#: Characters of an agent id shown without ``--wide`` (as ``docker ps`` shows ids).
SHORT_ID = 12
#: Columns left out, in this order, until the table fits ``NARROW_WIDTH``.
DROP_ORDER = ("FOREIGN", "LOAD", "POOL", "GPU", "HOST")


def render_status(records: Sequence[AgentRecord], now: float, *, pool: str | None = None,
                  pools: Sequence[str] = (), wide: bool = False) -> str:
    """The ``chiffon status`` table with a one-line summary; ``pool``: the filter asked
    for, ``pools``: the pools the registry knows (to say when the filter matched none).

    Without ``wide`` the table keeps to ``NARROW_WIDTH`` characters: agent ids show their
    first ``SHORT_ID`` characters (any unique prefix names an agent in other commands),
    and columns go in ``DROP_ORDER`` until it fits; the summary says which."""
    if not records and pool is not None and pools:
        return f"no agents in pool {pool}; pools: {', '.join(pools)}"
    if not records:
        return NO_AGENTS
    online = sum(1 for r in records if r.liveness(now) == "online")
    rows = [status_row(r, now) for r in records]
    headers = list(TABLE_HEADERS)
    dropped: list[str] = []
    if not wide:
        rows = [[row[0][:SHORT_ID], *row[1:]] for row in rows]
        for name in DROP_ORDER:
            if _width(render_table(headers, rows)) <= NARROW_WIDTH:
                break
            at = headers.index(name)
            headers.pop(at)
            rows = [[*row[:at], *row[at + 1:]] for row in rows]
            dropped.append(name.split()[0].lower())
    note = f" ({', '.join(dropped)}: --wide)" if dropped else ""
    return f"{render_table(headers, rows)}\n\n{online} of {len(records)} agents online{note}"


def _width(table: str) -> int:
    return max(len(line) for line in table.splitlines())
