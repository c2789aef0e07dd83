"""Memory metrics from psutil, capped by a cgroup memory limit. Units: GiB and percent.

Under a cgroup limit smaller than the host's memory, total is the limit and available is
``limit - working set`` where working set = usage - inactive page cache (``inactive_file``,
v1 ``total_inactive_file``), as kubelet, cAdvisor and ``docker stats`` count it: the kernel
reclaims that cache before it OOM-kills. Available is floored at 0 and never above the host's
available memory. Where ``memory.stat`` is unreadable, working set = usage.
"""

from __future__ import annotations

import time
from typing import Any

import psutil

from chiffon_worker.metrics.cgroup import CgroupLimits, MemoryLimit
from chiffon_worker.metrics.gpu_types import bytes_to_gib

#: How long a cgroup memory limit is trusted before being looked up again (seconds).
LIMIT_TTL_SECONDS = 30.0


def cgroup_available_bytes(limit: MemoryLimit, host_available: int) -> int:
    """Bytes this cgroup may still use: ``limit - working set`` (the whole limit where usage is
    unreadable), floored at 0 and capped by the host's available bytes."""
    working_set = limit.working_set_bytes()
    headroom = limit.limit_bytes - working_set if working_set is not None else limit.limit_bytes
    return max(0, min(host_available, headroom))


class MemoryMetrics:
    """Samples memory the way a scheduler needs it: what this process's cgroup may still use."""

    def __init__(self, sysfs_root: str = "/sys", proc_root: str = "/proc") -> None:
        self._limits = CgroupLimits(sysfs_root, proc_root)
        self._limit: MemoryLimit | None = None
        self._limit_read_at = float("-inf")

    def _cgroup_limit(self) -> MemoryLimit | None:
        now = time.monotonic()
        if now - self._limit_read_at >= LIMIT_TTL_SECONDS:
            self._limit = self._limits.memory_limit()
            self._limit_read_at = now
        return self._limit

    def sample(self) -> dict[str, Any]:
        """The memory keys of the snapshot."""
        vm = psutil.virtual_memory()
        total = int(vm.total)
        available = int(vm.available)
        limit = self._cgroup_limit()
        if limit is not None and limit.limit_bytes < total:
            total = limit.limit_bytes
            available = cgroup_available_bytes(limit, available)
        percent = 100.0 * (total - available) / total if total else 0.0
        return {
            "memory_percent": round(percent, 1),
            "memory_available_gb": bytes_to_gib(available),
            "memory_total_gb": bytes_to_gib(total),
        }
