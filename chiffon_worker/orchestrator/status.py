"""The views behind ``chiffon status``: JSON objects and a text table of the registry."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from chiffon_worker.orchestrator.registry import AgentRecord
from chiffon_worker.signing import SIGNATURE_KEY

TABLE_HEADERS = ("AGENT", "HOST", "POOL", "STATE", "AGE", "CORES", "LOAD", "MEM GiB", "GPU",
                 "VRAM GiB")


def status_object(record: AgentRecord, now: float) -> dict[str, Any]:
    """One agent for ``chiffon status --json``: registry fields, then its newest snapshot's
    keys (times in unix seconds, ``age_seconds`` since the newest heartbeat was received)."""
    obj: dict[str, Any] = {
        "agent_id": record.agent_id,
        "hostname": record.hostname,
        "pool": record.pool,
        "state": record.state(now),
        "age_seconds": round(record.age_seconds(now), 3),
        "boot_id": record.boot_id,
        "seq": record.seq,
        "restarts": record.restarts,
        "missed": record.missed,
        "first_seen": record.first_seen,
        "last_seen": record.last_seen,
        "clock_skew_seconds": record.clock_skew_seconds,
    }
    for key, value in record.snapshot.items():
        if key not in obj and key != SIGNATURE_KEY:
            obj[key] = value
    return obj


def format_age(seconds: float) -> str:
    """A short human duration: ``42s``, ``3m05s``, ``2h07m``, ``3d04h``."""
    total = int(max(0.0, seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600:02d}h"


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


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces."""
    body = [list(row) for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in body]
    return "\n".join(lines)


def render_status(records: Sequence[AgentRecord], now: float) -> str:
    """The ``chiffon status`` table with a one-line summary."""
    if not records:
        return "no agents in the registry yet"
    online = sum(1 for r in records if r.state(now) == "online")
    table = render_table(TABLE_HEADERS, (status_row(r, now) for r in records))
    return f"{table}\n\n{online} of {len(records)} agents online"
