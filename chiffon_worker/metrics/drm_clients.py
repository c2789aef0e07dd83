"""Processes using a DRM GPU (amdgpu, i915, xe), from ``/proc/<pid>/fdinfo``, as nvtop does.

The kernel's DRM client usage stats (``Documentation/gpu/drm-usage-stats.rst``): the
fdinfo of an open DRM file has ``key:<whitespace>value`` lines, among them
``drm-driver`` (``amdgpu``), ``drm-pdev`` (the PCI address, ``0000:03:00.0``),
``drm-client-id`` (one per ``struct drm_file``: a client opened once but reached through
several fds, after ``dup`` or ``fork``, shows the same id on each) and memory keys per
region: ``drm-total-<region>``, ``drm-resident-<region>`` and the older
``drm-memory-<region>`` (amdgpu: resident). Sizes are ``<uint> [KiB|MiB]``, no unit
meaning bytes. Regions: amdgpu ``vram``, ``gtt``, ``cpu``; xe ``vram0``, ``gtt``,
``system``, ``stolen``; i915 ``local0``, ``system0``, ``stolen-system0``.

A client's memory in a region is its resident size where the driver tells it, else its
total. A process's memory on one GPU sums its distinct clients (by ``drm-client-id``).

Cost: only fds whose link target is a ``/dev/dri/`` node have their fdinfo read, the scan
stops at a deadline and reports itself incomplete, and :class:`DrmClientScanner` reuses
a scan for ``min_interval_s`` seconds. Processes whose fds we may not read (EACCES:
another user's, without privileges) are skipped and counted in ``hidden``.
Units out: bytes (regions), GiB (:class:`~.gpu_types.GpuProcess`), seconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from chiffon_worker.metrics.drm import pci_address
from chiffon_worker.metrics.gpu_types import GpuProcess, bytes_to_gib
from chiffon_worker.metrics.sysfs import read_text

log = logging.getLogger(__name__)

Clock = Callable[[], float]
#: Region bytes of one process on one GPU to the bytes it counts as that GPU's memory
#: (``None``: the driver does not tell).
MemoryRule = Callable[[Mapping[str, int]], int | None]

DRI_PREFIX = "/dev/dri/"
INCOMPLETE = "scan incomplete"
#: Size units of the usage stats (the spec names KiB and MiB; the others are accepted
#: for robustness).
UNITS: dict[str, int] = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
#: Memory key kinds, most preferred first: what is resident now, then the older
#: amdgpu/i915 key (also resident), then everything allocated.
_MEMORY_KINDS = ("drm-resident-", "drm-memory-", "drm-total-")
#: Keys that share a memory prefix but are not sizes (xe: ``drm-total-cycles-rcs``).
_NOT_MEMORY = ("drm-total-cycles-",)


def parse_size(text: str) -> int:
    """``"1234 KiB"`` / ``"5 MiB"`` / ``"4096"`` (bytes) to bytes; ``ValueError`` otherwise."""
    number, _, unit = text.strip().partition(" ")
    factor = UNITS.get(unit.strip())
    if factor is None:
        raise ValueError(f"unknown size unit in {text!r}")
    return int(number) * factor


@dataclass(frozen=True)
class DrmClient:
    """One DRM client as one fdinfo file shows it. ``memory``: bytes per region."""

    driver: str
    pdev: str | None
    client_id: int | None
    memory: Mapping[str, int] = field(default_factory=dict)


def _fields(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _memory(fields: Mapping[str, str]) -> dict[str, int]:
    """Bytes per region, each from the most preferred key kind the driver printed."""
    found: dict[str, int] = {}
    for kind in reversed(_MEMORY_KINDS):  # least preferred first, overwritten by better
        for key, value in fields.items():
            if key.startswith(kind) and not key.startswith(_NOT_MEMORY):
                try:
                    found[key[len(kind):]] = parse_size(value)
                except ValueError:
                    log.debug("fdinfo: skipping %s: %r", key, value)
    return found


def parse_fdinfo(text: str) -> DrmClient | None:
    """The DRM client an fdinfo file describes; ``None`` if it is not a DRM file (no
    ``drm-driver`` key)."""
    fields = _fields(text)
    driver = fields.get("drm-driver")
    if not driver:
        return None
    raw_id = fields.get("drm-client-id")
    client_id = int(raw_id) if raw_id and raw_id.isdigit() else None
    pdev = fields.get("drm-pdev")
    return DrmClient(driver=driver, pdev=pdev.lower() if pdev else None, client_id=client_id,
                     memory=_memory(fields))


@dataclass(frozen=True)
class DrmProcess:
    """One process's use of one GPU: its distinct clients' memory summed per region
    (bytes; empty when no client told its memory)."""

    pid: int
    name: str | None
    driver: str
    pdev: str
    memory: Mapping[str, int]


@dataclass(frozen=True)
class DrmScan:
    """One pass over ``/proc``. ``error`` (``"scan incomplete"``, or why ``/proc`` could
    not be read) means ``processes`` is partial and must not be reported as complete;
    ``hidden``: processes whose fds could not be read (EACCES)."""

    processes: tuple[DrmProcess, ...]
    hidden: int = 0
    error: str | None = None


class ProcTree:
    """The ``/proc`` reads of a scan, below ``root`` (a recorded tree in tests).

    ``PermissionError`` from :meth:`dri_fds` / :meth:`fdinfo` means "not ours to read";
    ``FileNotFoundError`` means the process or fd is gone.
    """

    def __init__(self, root: str = "/proc") -> None:
        self.root = Path(root)

    def pids(self) -> list[int]:
        """Every process id (thread-group leader) listed, ascending."""
        with os.scandir(self.root) as entries:
            return sorted(int(e.name) for e in entries if e.name.isdigit())

    def dri_fds(self, pid: int) -> list[str]:
        """``pid``'s fd numbers whose link points at a ``/dev/dri/`` node."""
        found: list[str] = []
        with os.scandir(self.root / str(pid) / "fd") as entries:
            for entry in entries:
                try:
                    target = os.readlink(entry.path)
                except FileNotFoundError:
                    continue  # closed meanwhile
                if target.startswith(DRI_PREFIX):
                    found.append(entry.name)
        return found

    def fdinfo(self, pid: int, fd: str) -> str | None:
        """The text of ``<pid>/fdinfo/<fd>``; ``None`` if the fd was closed meanwhile."""
        return read_text(self.root / str(pid) / "fdinfo" / fd)

    def comm(self, pid: int) -> str | None:
        """``pid``'s executable name; ``None`` if unreadable or gone."""
        try:
            return read_text(self.root / str(pid) / "comm")
        except OSError:
            return None


def _process_clients(proc: ProcTree, pid: int) -> list[DrmClient]:
    """The DRM clients of one process, one per distinct ``(pdev, drm-client-id)`` (a
    client without an id counts once per fd). Raises ``PermissionError``."""
    seen: dict[tuple[str | None, int | str], DrmClient] = {}
    for fd in proc.dri_fds(pid):
        text = proc.fdinfo(pid, fd)
        client = None if text is None else parse_fdinfo(text)
        if client is None:
            continue
        key = client.client_id if client.client_id is not None else f"fd{fd}"
        seen.setdefault((client.pdev, key), client)
    return list(seen.values())


def _aggregate(pid: int, name: str | None, clients: Iterable[DrmClient]) -> list[DrmProcess]:
    """One :class:`DrmProcess` per GPU (``pdev``) the clients are on."""
    by_gpu: dict[tuple[str, str], dict[str, int]] = {}
    for client in clients:
        if client.pdev is None:
            continue  # not a PCI GPU: cannot be matched to a card
        regions = by_gpu.setdefault((client.driver, client.pdev), {})
        for region, size in client.memory.items():
            regions[region] = regions.get(region, 0) + size
    return [DrmProcess(pid=pid, name=name, driver=driver, pdev=pdev, memory=regions)
            for (driver, pdev), regions in by_gpu.items()]


def scan_drm_clients(proc: ProcTree, deadline: float, clock: Clock = time.monotonic
                     ) -> DrmScan:
    """Every process with a DRM client open, by GPU. Stops when ``clock()`` reaches
    ``deadline`` (seconds, ``clock``'s time base) and says so in ``error``."""
    try:
        pids = proc.pids()
    except OSError as exc:
        return DrmScan(processes=(), error=f"cannot list {proc.root}: {exc.strerror or exc}")
    found: list[DrmProcess] = []
    hidden = 0
    for pid in pids:
        if clock() >= deadline:
            log.debug("DRM client scan: deadline reached after %d processes", len(found))
            return DrmScan(processes=tuple(found), hidden=hidden, error=INCOMPLETE)
        try:
            clients = _process_clients(proc, pid)
        except PermissionError:
            hidden += 1
            continue
        except OSError as exc:  # exited meanwhile (ENOENT, ESRCH), or unreadable
            log.debug("DRM client scan: pid %d skipped: %s", pid, exc)
            continue
        if clients:
            found.extend(_aggregate(pid, proc.comm(pid), clients))
    return DrmScan(processes=tuple(found), hidden=hidden)


class DrmClientScanner:
    """Scans ``/proc`` for DRM clients at most once per ``min_interval_s`` seconds.

    ``proc_root``: where procfs is mounted (``/proc``; a recorded tree in tests, or
    pass ``proc``). ``scan_budget_s``: the longest one scan may take (seconds), after
    which it reports itself incomplete. ``clock``: monotonic seconds (injectable).
    """

    def __init__(self, proc_root: str = "/proc", *, min_interval_s: float = 5.0,
                 scan_budget_s: float = 0.5, clock: Clock = time.monotonic,
                 proc: ProcTree | None = None) -> None:
        self.proc = proc if proc is not None else ProcTree(proc_root)
        self.min_interval_s = min_interval_s
        self.scan_budget_s = scan_budget_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: DrmScan | None = None
        self._last_at = 0.0

    def scan(self) -> DrmScan:
        """The latest scan, made now unless one is younger than ``min_interval_s``."""
        with self._lock:
            now = self._clock()
            if self._last is not None and now - self._last_at < self.min_interval_s:
                return self._last
            result = scan_drm_clients(self.proc, now + self.scan_budget_s, self._clock)
            self._last, self._last_at = result, now
            if result.hidden:
                log.debug("DRM client scan: %d processes not readable", result.hidden)
            return result


def region_bytes(memory: Mapping[str, int], prefixes: Collection[str]) -> int | None:
    """The bytes of the regions whose name starts with one of ``prefixes``; ``None`` when
    the process reported none of them."""
    sizes = [size for region, size in memory.items()
             if any(region.startswith(p) for p in prefixes)]
    return sum(sizes) if sizes else None


def gpu_processes(scan: DrmScan, pdev: str, drivers: Collection[str], rule: MemoryRule
                  ) -> tuple[GpuProcess, ...]:
    """The processes of ``scan`` on the GPU at PCI address ``pdev`` driven by one of
    ``drivers``, by pid, memory per ``rule`` (GiB)."""
    out: list[GpuProcess] = []
    for process in scan.processes:
        if process.pdev != pdev or process.driver not in drivers:
            continue
        size = rule(process.memory)
        out.append(GpuProcess(pid=process.pid, name=process.name,
                              memory_gb=None if size is None else bytes_to_gib(size)))
    return tuple(sorted(out, key=lambda p: p.pid))


def card_processes(scan: DrmScan, card: Path, drivers: Collection[str], rule: MemoryRule
                   ) -> tuple[tuple[GpuProcess, ...] | None, tuple[str, ...]]:
    """``(processes, field errors)`` for one DRM card: ``()`` with no clients; ``None``
    with ``"processes: <why>"`` when the scan was incomplete; ``None`` without an error
    when the card is not a PCI device (fdinfo cannot be matched to it)."""
    if scan.error is not None:
        return None, (f"processes: {scan.error}",)
    pdev = pci_address(card)
    if pdev is None:
        return None, ()
    return gpu_processes(scan, pdev, drivers, rule), ()
