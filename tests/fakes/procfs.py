"""Fake ``/proc`` trees under ``tmp_path`` for the DRM client scan, laid out like procfs.

A process is ``<root>/<pid>/`` with ``comm``, ``fd/<n>`` (a symlink to what the fd is
open on: ``/dev/dri/renderD128``, ``/dev/nvidia0``, ``socket:[123]``; dangling links
are fine, ``readlink`` does not follow them) and ``fdinfo/<n>`` (its text). Non-process
entries (``self``, ``meminfo``, ``sys``) are written too, so that a reader which forgot
to skip them trips.

The fdinfo builders produce the shapes the drivers print (``key:\\tvalue`` lines; see
the kernel's ``Documentation/gpu/drm-usage-stats.rst``, ``amdgpu_fdinfo.c``,
``xe_drm_client.c``); the numbers are the test's ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RENDER_NODE = "/dev/dri/renderD128"
PLAIN_FDINFO = "pos:\t0\nflags:\t0100002\nmnt_id:\t25\nino:\t7\n"


@dataclass(frozen=True)
class Fd:
    """One open fd: what its link points at, and its fdinfo text."""

    number: int
    target: str
    fdinfo: str = PLAIN_FDINFO


@dataclass(frozen=True)
class Process:
    """One process as procfs shows it."""

    pid: int
    comm: str
    fds: tuple[Fd, ...] = ()


STDIO = (Fd(0, "/dev/pts/0"), Fd(1, "/dev/pts/0"), Fd(2, "socket:[40961]"))


def _lines(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"{key}:\t{value}\n" for key, value in pairs)


def amdgpu_fdinfo(pdev: str, client_id: int, vram: str, gtt: str = "0 KiB") -> str:
    """amdgpu's fdinfo: the older ``drm-memory-*`` keys (resident, in KiB in practice)."""
    return PLAIN_FDINFO + _lines([
        ("drm-driver", "amdgpu"), ("drm-pdev", pdev), ("drm-client-id", str(client_id)),
        ("pasid", "32770"), ("drm-memory-vram", vram), ("drm-memory-gtt", gtt),
        ("drm-memory-cpu", "0 KiB"), ("drm-engine-gfx", "123456789 ns"),
    ])


def xe_fdinfo(pdev: str, client_id: int, total_vram0: str, resident_vram0: str,
              gtt: str = "384 KiB") -> str:
    """xe's fdinfo: ``drm-total-*`` / ``drm-resident-*`` per region, cycle counters."""
    return PLAIN_FDINFO + _lines([
        ("drm-driver", "xe"), ("drm-client-id", str(client_id)), ("drm-pdev", pdev),
        ("drm-total-system", "0"), ("drm-resident-system", "0"),
        ("drm-total-gtt", gtt), ("drm-resident-gtt", gtt),
        ("drm-total-vram0", total_vram0), ("drm-shared-vram0", "8 MiB"),
        ("drm-resident-vram0", resident_vram0),
        ("drm-cycles-rcs", "12345678"), ("drm-total-cycles-rcs", "9000000000"),
    ])


def i915_fdinfo(pdev: str, client_id: int, system0: str) -> str:
    """i915's fdinfo on an integrated GPU: system-memory regions only."""
    return PLAIN_FDINFO + _lines([
        ("drm-driver", "i915"), ("drm-pdev", pdev), ("drm-client-id", str(client_id)),
        ("drm-engine-render", "7340012345 ns"), ("drm-total-system0", system0),
        ("drm-resident-system0", system0), ("drm-total-stolen-system0", "0"),
    ])


def write_process(root: Path, process: Process) -> Path:
    """Write ``process`` under the procfs root ``root``; returns its directory."""
    base = root / str(process.pid)
    (base / "fd").mkdir(parents=True)
    (base / "fdinfo").mkdir()
    (base / "comm").write_text(process.comm + "\n")
    for fd in process.fds:
        (base / "fd" / str(fd.number)).symlink_to(fd.target)
        (base / "fdinfo" / str(fd.number)).write_text(fd.fdinfo)
    return base


def write_proc(root: Path, *processes: Process) -> Path:
    """A procfs root with ``processes`` and the usual non-process entries; returns it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "meminfo").write_text("MemTotal:       65536000 kB\n")
    (root / "sys").mkdir(exist_ok=True)
    if not (root / "self").is_symlink():
        (root / "self").symlink_to("1")
    for process in processes:
        write_process(root, process)
    return root
