"""What an agent can take on, in its worker's ``stats`` reply: Flower's "Other" tab.

Flower shows every key of a worker's ``stats`` reply it does not know on the worker's
page, tab "Other" (one row per key, the value as text), and returns the whole reply in
``/api/workers``. The agent adds its figures as keys of their own, each named with
:data:`STATS_PREFIX` (``chiffon_``), so each is a row of that tab; meant for a person
reading them, units in the key names (``_gb``: GiB, ``_s``:
seconds), GPUs numbered by their place in the snapshot's ``gpus`` list (``gpu0_...``):

- intake, read now (a lock, no broker call): ``accepting``, ``hold_reason`` (why not: a
  drain first, then the owner rules), ``drained``, ``owner_rules_hold`` (the owner rules'
  reason, or None), ``work_running``;
- capacity, from the agent's latest snapshot (what its last heartbeat said; see
  :mod:`.latest_snapshot`): cores (``cpu_cores_effective``, ``_busy``, ``_available``),
  memory, every GPU's VRAM (``gpuN_vram_total_gb``, ``gpuN_vram_available_gb``,
  ``gpuN_vram_known``: false when the GPU does not tell its free VRAM, the number is
  then None), health, and the GPU probe's state;
- ``snapshot_seq`` (the heartbeat it came from; 0: taken for this view) and
  ``snapshot_age_s``.
"""

from __future__ import annotations

from typing import Any

from chiffon_worker.agents.intake import DRAIN, OWNER, WorkIntake
from chiffon_worker.worker.latest_snapshot import recent_snapshot
from chiffon_worker.worker.runtime import get_agent, get_config

#: What the agent's keys in the worker's ``stats`` reply start with (Flower shows one row
#: per key; a single dict would be one row of Python repr).
STATS_PREFIX = "chiffon_"
#: Decimals shown: GiB and cores to 0.01, ages to 0.1 s.
_GB_DECIMALS = 2
_CORE_DECIMALS = 2
_AGE_DECIMALS = 1


def _rounded(value: Any, decimals: int) -> Any:
    """``value`` rounded when it is a number (bool and None pass through)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    return round(float(value), decimals)


def intake_stats(intake: WorkIntake) -> dict[str, Any]:
    """Whether the agent takes pool work now, and what holds it back."""
    keys = intake.snapshot_keys()
    return {"accepting": keys["accepting"], "hold_reason": keys["accepting_reason"],
            "drained": intake.held_by(DRAIN) is not None,
            "owner_rules_hold": intake.held_by(OWNER),
            "work_running": keys["work_running"]}


def gpu_stats(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The GPU summary, the probe's state, then each GPU's VRAM and health."""
    probe = snapshot.get("gpu_probe") or {}
    shown: dict[str, Any] = {
        "gpu_count": snapshot.get("gpu_count"),
        "gpu_health": snapshot.get("gpu_health"),
        "gpu_health_reason": snapshot.get("gpu_health_reason"),
        "gpu_probe_state": probe.get("state"),
        "gpu_probe_source": probe.get("source"),
        "gpu_probe_age_s": _rounded(probe.get("age_seconds"), _AGE_DECIMALS),
        "gpu_probe_error": probe.get("error"),
    }
    for position, gpu in enumerate(snapshot.get("gpus") or ()):
        prefix = f"gpu{position}_"
        available = gpu.get("vram_available_gb")
        shown.update({
            prefix + "name": gpu.get("name"),
            prefix + "vram_total_gb": _rounded(gpu.get("vram_total_gb"), _GB_DECIMALS),
            prefix + "vram_available_gb": _rounded(available, _GB_DECIMALS),
            prefix + "vram_known": available is not None,
            prefix + "health": gpu.get("health"),
            prefix + "health_reason": gpu.get("health_reason"),
        })
        if gpu.get("unified"):
            shown[prefix + "unified_memory"] = True
        if gpu.get("mig"):
            shown[prefix + "mig_units"] = len(gpu["mig"])
        if gpu.get("error"):
            shown[prefix + "error"] = gpu["error"]
    return shown


def capacity_stats(snapshot: dict[str, Any], age_seconds: float,
                   intake: WorkIntake) -> dict[str, Any]:
    """The ``chiffon`` entry of the stats reply: ``intake`` now, the rest from
    ``snapshot``, which is ``age_seconds`` old (see the module docstring for the keys)."""
    shown: dict[str, Any] = {"agent_id": snapshot.get("agent_id"),
                             "pool": snapshot.get("pool")}
    shown.update(intake_stats(intake))
    shown.update({
        "cpu_cores_effective": _rounded(snapshot.get("cpu_cores_effective"), _CORE_DECIMALS),
        "cpu_cores_busy": _rounded(snapshot.get("cpu_cores_busy"), _CORE_DECIMALS),
        "cpu_cores_available": _rounded(snapshot.get("cpu_cores_available"), _CORE_DECIMALS),
        "memory_total_gb": _rounded(snapshot.get("memory_total_gb"), _GB_DECIMALS),
        "memory_available_gb": _rounded(snapshot.get("memory_available_gb"), _GB_DECIMALS),
    })
    shown.update(gpu_stats(snapshot))
    idle = snapshot.get("owner_idle_seconds")
    shown.update({
        "owner_idle_s": _rounded(idle, _AGE_DECIMALS),
        "on_battery": snapshot.get("on_battery"),
        "asleep": snapshot.get("asleep"),
        "snapshot_seq": snapshot.get("seq"),
        "snapshot_age_s": round(max(0.0, age_seconds), _AGE_DECIMALS),
    })
    return shown


def agent_stats() -> dict[str, Any]:
    """This agent's :func:`capacity_stats`, from its latest snapshot while that is recent
    (else one taken now, kept for the next call)."""
    config, agent = get_config(), get_agent()
    kept = recent_snapshot(config.heartbeat_interval_seconds,
                           lambda: agent.snapshot(heartbeat=False))
    return capacity_stats(kept.snapshot, kept.age_seconds(), agent.intake)


def stats_rows() -> dict[str, Any]:
    """:func:`agent_stats` as keys of the ``stats`` reply, each with :data:`STATS_PREFIX`."""
    return {f"{STATS_PREFIX}{key}": value for key, value in agent_stats().items()}
