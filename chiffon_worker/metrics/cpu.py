"""CPU metrics: load, busy percent, effective and available cores. Non-blocking: never sleeps.

Effective cores = physical cores (logical where psutil cannot tell), capped by this
process's CPU affinity, its cgroup cpuset and a cgroup CPU quota. Units: cores as counts
(the quota may make them fractional), load as run-queue length, percent as 0-100, clock
readings and CPU time in seconds.

Busy cores, subtracted from effective cores to give available cores, come from one of two
sources (reported as ``cpu_busy_source``):

* ``"load"`` on bare metal (no quota, no cpuset or affinity narrower than the machine):
  the host's 1-minute load average, and available = ``max(1, effective - load)`` as ever.
* ``"cgroup"`` where a quota or cpuset restricts the agent: the rate at which this process's
  cgroup used CPU time (v2 ``cpu.stat`` ``usage_usec``, v1 ``cpuacct.usage``) between the
  previous sample and this one, capped at the effective cores. A busy host no longer makes an
  idle container look full. Available = ``max(min(1, effective), effective - busy)``: the
  floor of one core never exceeds a quota below one CPU.

A rate needs two readings. On the first sample in a restricted cgroup, and on any sample
whose usage reading is missing, garbage, or does not follow a good one (the counter went
backwards, no time passed, or the previous reading failed), the busy figure is the
1-minute load capped at the effective cores, with source ``"load"``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from chiffon_worker.metrics.cgroup import CgroupLimits, CpuUsage

log = logging.getLogger(__name__)

#: How long the cgroup quota, cpuset and affinity are trusted before being read again (s).
LIMITS_TTL_SECONDS = 30.0
#: ``cpu_busy_source`` when busy cores are the host's 1-minute load average.
SOURCE_LOAD = "load"
#: ``cpu_busy_source`` when busy cores are the rate of the cgroup's own CPU usage.
SOURCE_CGROUP = "cgroup"


def physical_cores() -> int:
    """Physical cores, falling back to logical cores, then 1."""
    count = psutil.cpu_count(logical=False)
    if not count:
        count = psutil.cpu_count(logical=True)
    return max(1, count or 1)


def _affinity_count() -> int | None:
    """Logical CPUs in this process's affinity mask, or None where the OS cannot tell."""
    try:
        return len(os.sched_getaffinity(0)) or None
    except (AttributeError, OSError):
        return None


@dataclass(frozen=True)
class UsageReading:
    """One reading of a cgroup's CPU time counter: which file, CPU seconds, clock seconds."""

    path: Path
    cpu_seconds: float
    at: float


def busy_cores_between(previous: UsageReading, current: UsageReading) -> float | None:
    """Cores kept busy between two readings: CPU seconds used per wall second elapsed.
    None when the pair gives no rate: different files, no time passed, counter went back."""
    elapsed = current.at - previous.at
    used = current.cpu_seconds - previous.cpu_seconds
    if current.path != previous.path or elapsed <= 0 or used < 0:
        return None
    return used / elapsed


class CpuMetrics:
    """Samples CPU load and capacity; cheap enough to call on every heartbeat (~10 µs).

    ``clock`` returns monotonic seconds (``time.monotonic``); tests step it instead of sleeping.
    """

    def __init__(self, sysfs_root: str = "/sys", proc_root: str = "/proc", *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = CgroupLimits(sysfs_root, proc_root)
        self._clock = clock
        self._physical = physical_cores()
        self._logical = psutil.cpu_count(logical=True) or self._physical
        self._effective = float(self._physical)
        self._restricted = False
        self._usage: CpuUsage | None = None
        self._previous: UsageReading | None = None
        self._limits_read_at = float("-inf")
        self._primed = False

    def _refresh_limits(self, now: float) -> None:
        """Re-read quota, cpuset and affinity (at most every ``LIMITS_TTL_SECONDS``)."""
        if now - self._limits_read_at < LIMITS_TTL_SECONDS:
            return
        caps: list[float] = [float(self._physical)]
        allowed: list[int] = []  # CPU counts of the affinity mask and the cpuset
        for count in (_affinity_count(), self._limits.cpuset_cpus()):
            if count is not None:
                caps.append(float(count))
                allowed.append(count)
        quota = self._limits.cpu_quota()
        if quota is not None:
            caps.append(quota)
        self._effective = min(caps)
        self._restricted = quota is not None or any(n < self._logical for n in allowed)
        usage = self._limits.cpu_usage() if self._restricted else None
        if usage != self._usage:
            self._previous = None  # another counter: no rate against the old one
        self._usage = usage
        self._limits_read_at = now

    def effective_cores(self) -> float:
        """Cores this process can use: physical, capped by affinity, cpuset and quota."""
        self._refresh_limits(self._clock())
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

    def _cgroup_busy_cores(self, now: float) -> float | None:
        """Cores the cgroup kept busy since the previous sample, or None (no rate yet, or the
        counter is unreadable). Keeps this reading for the next sample."""
        seconds = self._usage.seconds() if self._usage is not None else None
        if self._usage is None or seconds is None:
            self._previous = None
            return None
        current = UsageReading(self._usage.path, seconds, now)
        previous, self._previous = self._previous, current
        return busy_cores_between(previous, current) if previous is not None else None

    def _busy_cores(self, load1: float, cores: float, now: float) -> tuple[float, str]:
        """Busy cores and their source (``SOURCE_LOAD`` or ``SOURCE_CGROUP``)."""
        if not self._restricted:
            return load1, SOURCE_LOAD
        rate = self._cgroup_busy_cores(now)
        if rate is None:
            return min(load1, cores), SOURCE_LOAD
        return min(rate, cores), SOURCE_CGROUP

    def sample(self) -> dict[str, Any]:
        """The CPU keys of the snapshot."""
        load1, load5, load15 = psutil.getloadavg()
        now = self._clock()
        self._refresh_limits(now)
        cores = self._effective
        busy, source = self._busy_cores(load1, cores, now)
        floor = min(1.0, cores) if self._restricted else 1.0
        return {
            "cpu_percent": self.busy_percent(),
            "cpu_load_1min": round(load1, 2),
            "cpu_load_5min": round(load5, 2),
            "cpu_load_15min": round(load15, 2),
            "cpu_cores_physical": self._physical,
            "cpu_cores_effective": round(cores, 2),
            "cpu_cores_available": round(max(floor, cores - busy), 2),
            "cpu_cores_busy": round(busy, 2),
            "cpu_busy_source": source,
        }
