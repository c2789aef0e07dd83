"""Fake cgroup trees under ``tmp_path``, laid out like the kernel's: ``sys/fs/cgroup/...``
for the hierarchy and ``proc/self/cgroup`` naming this process's cgroup in it.

v2 has one unified hierarchy (``0::/path``); v1 mounts one directory per controller group
(``cpu,cpuacct``, ``memory``) and lists each on its own ``/proc/self/cgroup`` line. Values are
written raw, as the kernel shows them (microseconds, nanoseconds, bytes).
"""

from __future__ import annotations

from pathlib import Path

#: Where a Kubernetes container sits in the unified (v2) hierarchy.
V2_CONTAINER = "/kubepods/pod1/ctr"
#: Where a Docker container sits in each v1 controller hierarchy.
V1_CONTAINER = "/docker/ctr"
#: v1 controller directories a container uses, as mounted (co-mounted ones share a name).
V1_CONTROLLERS = ("cpu,cpuacct", "memory")


class CgroupTree:
    """One fake host: pass ``sysfs_root`` and ``proc_root`` to the code under test."""

    def __init__(self, root: Path, own: dict[str, str]) -> None:
        """``own``: controller directory (``""`` for v2) -> this process's cgroup path."""
        self.sysfs_root = str(root / "sys")
        self.proc_root = str(root / "proc")
        self.hierarchy = root / "sys" / "fs" / "cgroup"
        self.own = own
        lines = [f"{number}:{controller}:{path}"
                 for number, (controller, path) in enumerate(own.items())]
        self._write(root / "proc" / "self" / "cgroup", "\n".join(lines))
        for controller, path in own.items():
            self.directory(controller, path).mkdir(parents=True, exist_ok=True)

    @classmethod
    def v2(cls, root: Path, path: str = V2_CONTAINER) -> CgroupTree:
        """A unified hierarchy with this process in ``path``."""
        return cls(root, {"": path})

    @classmethod
    def v1(cls, root: Path, path: str = V1_CONTAINER,
           controllers: tuple[str, ...] = V1_CONTROLLERS) -> CgroupTree:
        """v1 hierarchies, one per controller directory, with this process in ``path``."""
        return cls(root, dict.fromkeys(controllers, path))

    def directory(self, controller: str = "", path: str | None = None) -> Path:
        """A cgroup directory: ``path`` (default: this process's) under ``controller``."""
        own = self.own[controller] if path is None else path
        return self.hierarchy / controller / own.lstrip("/")

    def write(self, name: str, value: int | str, controller: str = "",
              path: str | None = None) -> Path:
        """Write attribute ``name`` in this process's cgroup (or ``path``) of ``controller``."""
        return self._write(self.directory(controller, path) / name, value)

    @staticmethod
    def _write(file: Path, value: int | str) -> Path:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(f"{value}\n")
        return file


def cpu_stat(usage_usec: int) -> str:
    """A v2 ``cpu.stat`` with ``usage_usec`` (microseconds) and the lines around it."""
    return (f"usage_usec {usage_usec}\nuser_usec {usage_usec // 2}\n"
            f"system_usec {usage_usec - usage_usec // 2}\nnr_periods 0\nnr_throttled 0\n"
            "throttled_usec 0")


def memory_stat(**values: int) -> str:
    """A ``memory.stat`` holding ``values`` (bytes) among unrelated lines."""
    lines = {"anon": 1 << 20, **values, "pgfault": 12345}
    return "\n".join(f"{key} {value}" for key, value in lines.items())
