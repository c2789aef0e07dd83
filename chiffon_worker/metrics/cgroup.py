"""cgroup limits (v2 and v1) read from a sysfs root, so tests replay recorded trees.

Limits nest: the effective limit is the smallest one on the path from this process's
cgroup up to the root of the mounted hierarchy. Units: CPUs as a float (1.5 = one and a
half CPUs), memory in bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from chiffon_worker.metrics.sysfs import read_text_or_none

log = logging.getLogger(__name__)

#: cgroup v1 reports "no limit" as a huge page-aligned number; anything above this is none.
_V1_UNLIMITED_BYTES = 1 << 62


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
    """Reads the CPU quota and memory limit that apply to this process.

    ``sysfs_root`` is where sysfs is mounted (``/sys``); ``proc_root`` is procfs (``/proc``),
    used only to find this process's own cgroup below the hierarchy's root.
    """

    def __init__(self, sysfs_root: str = "/sys", proc_root: str = "/proc") -> None:
        self._cgroup = Path(sysfs_root) / "fs" / "cgroup"
        self._own = _own_paths(Path(proc_root))

    def cpu_quota(self) -> float | None:
        """CPUs allowed by a CFS quota (v2 ``cpu.max``, v1 ``cfs_quota_us/cfs_period_us``)."""
        limits: list[float] = []
        for directory in _candidates(self._cgroup, self._own.get("")):
            quota = _parse_cpu_max(read_text_or_none(directory / "cpu.max"))
            if quota is not None:
                limits.append(quota)
        for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            base = self._cgroup / name
            if not base.is_dir():
                continue
            for directory in _candidates(base, self._own.get("cpu")):
                quota = _parse_cfs(read_text_or_none(directory / "cpu.cfs_quota_us"),
                                   read_text_or_none(directory / "cpu.cfs_period_us"))
                if quota is not None:
                    limits.append(quota)
            break
        return min(limits) if limits else None

    def memory_limit(self) -> MemoryLimit | None:
        """The tightest memory limit on this process's cgroup path, or None."""
        best: MemoryLimit | None = None
        for directory in _candidates(self._cgroup, self._own.get("")):
            limit = _parse_bytes(read_text_or_none(directory / "memory.max"))
            if limit is not None and (best is None or limit < best.limit_bytes):
                best = MemoryLimit(limit, directory / "memory.current")
        base = self._cgroup / "memory"
        if base.is_dir():
            for directory in _candidates(base, self._own.get("memory")):
                limit = _parse_bytes(read_text_or_none(directory / "memory.limit_in_bytes"))
                if limit is not None and (best is None or limit < best.limit_bytes):
                    best = MemoryLimit(limit, directory / "memory.usage_in_bytes")
        return best


@dataclass(frozen=True)
class MemoryLimit:
    """A cgroup memory limit (bytes) and the file holding that cgroup's current usage."""

    limit_bytes: int
    usage_path: Path

    def usage_bytes(self) -> int | None:
        """Current usage of the limited cgroup in bytes, or None if unreadable."""
        return _parse_bytes(read_text_or_none(self.usage_path))


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
