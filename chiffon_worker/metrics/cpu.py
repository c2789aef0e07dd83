"""CPU metrics: load, busy percent and effective cores. Non-blocking: never sleeps.

Effective cores = physical cores (logical where psutil cannot tell), capped by this
process's CPU affinity and by a cgroup CPU quota. Units: cores as counts (the quota
may make them fractional), load as run-queue length, percent as 0-100.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import psutil

from chiffon_worker.metrics.cgroup import CgroupLimits

log = logging.getLogger(__name__)

#: How long the cgroup quota and affinity are trusted before being read again (seconds).
LIMITS_TTL_SECONDS = 30.0


def physical_cores() -> int:
    """Physical cores, falling back to logical cores, then 1."""
    count = psutil.cpu_count(logical=False)
    if not count:
        count = psutil.cpu_count(logical=True)
    return max(1, count or 1)


def _affinity_count() -> int | None:
    try:
        return len(os.sched_getaffinity(0)) or None
    except (AttributeError, OSError):
        return None


class CpuMetrics:
    """Samples CPU load and capacity; cheap enough to call on every heartbeat (~10 µs)."""

    def __init__(self, sysfs_root: str = "/sys", proc_root: str = "/proc") -> None:
        self._limits = CgroupLimits(sysfs_root, proc_root)
        self._physical = physical_cores()
        self._effective = float(self._physical)
        self._limits_read_at = float("-inf")
        self._primed = False

    def effective_cores(self) -> float:
        """Cores this process can use: physical, capped by affinity and cgroup quota."""
        now = time.monotonic()
        if now - self._limits_read_at >= LIMITS_TTL_SECONDS:
            caps: list[float] = [float(self._physical)]
            affinity = _affinity_count()
            if affinity is not None:
                caps.append(float(affinity))
            quota = self._limits.cpu_quota()
            if quota is not None:
                caps.append(quota)
            self._effective = min(caps)
            self._limits_read_at = now
        return self._effective

    def busy_percent(self) -> float:
        """CPU busy % since the previous call; the first call reports the average since boot
        (psutil's own first answer would be a meaningless 0.0). Never sleeps."""
        if self._primed:
            return float(psutil.cpu_percent(interval=None))
        self._primed = True
        psutil.cpu_percent(interval=None)  # start psutil's interval from now
        times = psutil.cpu_times()
        idle = times.idle + getattr(times, "iowait", 0.0)
        total = sum(times)
        # guest time is already counted in user time on Linux
        total -= getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
        return round(100.0 * (1.0 - idle / total), 1) if total > 0 else 0.0

    def sample(self) -> dict[str, Any]:
        """The CPU keys of the snapshot."""
        load1, load5, load15 = psutil.getloadavg()
        cores = self.effective_cores()
        return {
            "cpu_percent": self.busy_percent(),
            "cpu_load_1min": round(load1, 2),
            "cpu_load_5min": round(load5, 2),
            "cpu_load_15min": round(load15, 2),
            "cpu_cores_physical": self._physical,
            "cpu_cores_effective": round(cores, 2),
            "cpu_cores_available": round(max(1.0, cores - load1), 2),
        }
