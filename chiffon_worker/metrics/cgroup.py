"""cgroup limits and usage (v2 and v1) read from a sysfs root, so tests replay recorded trees.

Limits nest: the effective limit is the smallest one on the path from this process's
cgroup up to the root of the mounted hierarchy. Usage is read from the deepest directory on
that path that holds the usage file. Units: CPUs as a float (1.5 = one and a half CPUs),
CPU time in seconds, memory in bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from chiffon_worker.metrics.sysfs import read_text_or_none

log = logging.getLogger(__name__)

#: cgroup v1 reports "no limit" as a huge page-aligned number (9223372036854771712 on
#: x86-64); any value of 2**62 bytes or more counts as no limit.
_V1_UNLIMITED_BYTES = 1 << 62
#: Seconds per unit of v2 ``cpu.stat`` ``usage_usec`` (microseconds).
_SECONDS_PER_USEC = 1e-6
#: Seconds per unit of v1 ``cpuacct.usage`` (nanoseconds).
_SECONDS_PER_NSEC = 1e-9
#: v1 directories that may hold the cpu controller (alone or co-mounted with cpuacct).
_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")
#: v1 directories that may hold the cpuacct controller.
_V1_CPUACCT_DIRS = ("cpuacct", "cpu,cpuacct", "cpuacct,cpu")


def _own_paths(proc_root: Path) -> dict[str, str]:
    """Controller -> this process's cgroup path, from ``/proc/self/cgroup``; ``""`` is v2."""
    text = read_text_or_none(proc_root / "self" / "cgroup") or ""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers = parts[1].split(",") if parts[1] else [""]
        for controller in controllers:
            paths[controller] = parts[2]
    return paths


def _candidates(base: Path, own: str | None) -> list[Path]:
    """Directories from this process's cgroup up to ``base``, deepest first."""
    out: list[Path] = []
    if own and own != "/":
        current = base / own.lstrip("/")
        while current != base and base in current.parents:
            if current.is_dir():
                out.append(current)
            current = current.parent
    out.append(base)
    return out


class CgroupLimits:
    """Reads the CPU quota, cpuset, CPU usage and memory limit that apply to this process.

    ``sysfs_root`` is where sysfs is mounted (``/sys``); ``proc_root`` is procfs (``/proc``),
    used only to find this process's own cgroup below the hierarchy's root.
    """

    def __init__(self, sysfs_root: str = "/sys", proc_root: str = "/proc") -> None:
        self._cgroup = Path(sysfs_root) / "fs" / "cgroup"
        self._own = _own_paths(Path(proc_root))

    def _v1_bases(self, names: tuple[str, ...]) -> list[Path]:
        """The first existing v1 controller directory among ``names`` (at most one)."""
        for name in names:
            base = self._cgroup / name
            if base.is_dir():
                return [base]
        return []

    def cpu_quota(self) -> float | None:
        """CPUs allowed by a CFS quota (v2 ``cpu.max``, v1 ``cfs_quota_us/cfs_period_us``)."""
        limits: list[float] = []
        for directory in _candidates(self._cgroup, self._own.get("")):
            quota = _parse_cpu_max(read_text_or_none(directory / "cpu.max"))
            if quota is not None:
                limits.append(quota)
        for base in self._v1_bases(_V1_CPU_DIRS):
            for directory in _candidates(base, self._own.get("cpu")):
                quota = _parse_cfs(read_text_or_none(directory / "cpu.cfs_quota_us"),
                                   read_text_or_none(directory / "cpu.cfs_period_us"))
                if quota is not None:
                    limits.append(quota)
        return min(limits) if limits else None

    def cpuset_cpus(self) -> int | None:
        """How many CPUs this process's cpuset allows (v2 ``cpuset.cpus.effective``, v1
        ``cpuset.effective_cpus`` or ``cpuset.cpus``), from the deepest directory on its path
        that holds the file; None where no cpuset file is readable."""
        for directory in _candidates(self._cgroup, self._own.get("")):
            text = read_text_or_none(directory / "cpuset.cpus.effective")
            if text is not None:
                return parse_cpu_list(text)
        for base in self._v1_bases(("cpuset",)):
            for directory in _candidates(base, self._own.get("cpuset")):
                for name in ("cpuset.effective_cpus", "cpuset.cpus"):
                    text = read_text_or_none(directory / name)
                    if text is not None:
                        return parse_cpu_list(text)
        return None

    def cpu_usage(self) -> CpuUsage | None:
        """Where this process's cgroup counts its CPU time: v2 ``cpu.stat`` or else v1
        ``cpuacct.usage``, in the deepest directory on its path holding the file; or None."""
        for directory in _candidates(self._cgroup, self._own.get("")):
            if read_text_or_none(directory / "cpu.stat") is not None:
                return CpuUsage(directory / "cpu.stat", _SECONDS_PER_USEC, "usage_usec")
        for base in self._v1_bases(_V1_CPUACCT_DIRS):
            for directory in _candidates(base, self._own.get("cpuacct")):
                if read_text_or_none(directory / "cpuacct.usage") is not None:
                    return CpuUsage(directory / "cpuacct.usage", _SECONDS_PER_NSEC)
        return None

    def memory_limit(self) -> MemoryLimit | None:
        """The tightest memory limit on this process's cgroup path, or None."""
        best: MemoryLimit | None = None
        for directory in _candidates(self._cgroup, self._own.get("")):
            limit = _parse_bytes(read_text_or_none(directory / "memory.max"))
            if limit is not None and (best is None or limit < best.limit_bytes):
                best = MemoryLimit(limit, directory / "memory.current",
                                   directory / "memory.stat")
        for base in self._v1_bases(("memory",)):
            for directory in _candidates(base, self._own.get("memory")):
                limit = _parse_bytes(read_text_or_none(directory / "memory.limit_in_bytes"))
                if limit is not None and (best is None or limit < best.limit_bytes):
                    best = MemoryLimit(limit, directory / "memory.usage_in_bytes",
                                       directory / "memory.stat")
        return best


@dataclass(frozen=True)
class CpuUsage:
    """A cgroup's cumulative CPU time counter: the file, its unit and (for a ``key value``
    stat file) the line holding it."""

    path: Path
    seconds_per_unit: float
    key: str | None = None

    def seconds(self) -> float | None:
        """CPU seconds the cgroup has used since it was created; None if unreadable."""
        text = read_text_or_none(self.path)
        count = parse_stat_value(text, self.key) if self.key else _parse_count(text)
        if count is None:
            log.debug("unreadable CPU usage in %s", self.path)
            return None
        return count * self.seconds_per_unit


@dataclass(frozen=True)
class MemoryLimit:
    """A cgroup memory limit (bytes) and the files holding that cgroup's current usage and
    its ``memory.stat``."""

    limit_bytes: int
    usage_path: Path
    stat_path: Path

    def usage_bytes(self) -> int | None:
        """Current usage of the limited cgroup in bytes, or None if unreadable."""
        return _parse_bytes(read_text_or_none(self.usage_path))

    def inactive_file_bytes(self) -> int | None:
        """Reclaimable page cache of the limited cgroup in bytes: ``total_inactive_file``
        (v1, hierarchical) or else ``inactive_file`` (v2, v1); None if unreadable."""
        text = read_text_or_none(self.stat_path)
        total = parse_stat_value(text, "total_inactive_file")
        return total if total is not None else parse_stat_value(text, "inactive_file")

    def working_set_bytes(self) -> int | None:
        """Usage less reclaimable page cache (kubelet's and ``docker stats``' working set),
        floored at 0, in bytes; usage alone if ``memory.stat`` is unreadable; None if the
        usage is unreadable."""
        usage = self.usage_bytes()
        if usage is None:
            return None
        inactive = self.inactive_file_bytes()
        return usage if inactive is None else max(0, usage - inactive)


def parse_stat_value(text: str | None, key: str) -> int | None:
    """The value of the ``key value`` line named ``key`` in a cgroup stat file (``cpu.stat``,
    ``memory.stat``); None if absent, negative or not an integer."""
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return _parse_count(parts[1])
    return None


def parse_cpu_list(text: str) -> int | None:
    """How many CPUs a kernel CPU list names: ``"0-3,8"`` -> 5; empty or garbage -> None."""
    count = 0
    for part in text.strip().split(","):
        first, _, last = part.partition("-")
        try:
            low = int(first)
            high = int(last) if last else low
        except ValueError:
            return None
        if low < 0 or high < low:
            return None
        count += high - low + 1
    return count or None


def _parse_count(text: str | None) -> int | None:
    """A non-negative integer counter (0 allowed), or None for garbage."""
    try:
        value = int(text or "")
    except ValueError:
        return None
    return value if value >= 0 else None


def _parse_cpu_max(text: str | None) -> float | None:
    """``"150000 100000"`` -> 1.5; ``"max 100000"`` or garbage -> None."""
    if not text:
        return None
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100000
    except ValueError:
        log.debug("unparseable cpu.max %r", text)
        return None
    return quota / period if quota > 0 and period > 0 else None


def _parse_cfs(quota_text: str | None, period_text: str | None) -> float | None:
    """v1: quota -1 means none; otherwise quota/period CPUs."""
    try:
        quota = int(quota_text or "")
        period = int(period_text or "")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _parse_bytes(text: str | None) -> int | None:
    """A byte count, or None for ``max``, v1's near-2^63 "unlimited", or garbage."""
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < _V1_UNLIMITED_BYTES else None
