"""DRM client scan: processes per GPU from /proc/<pid>/fdinfo, bounded and cached."""

from __future__ import annotations

import errno
from collections.abc import Mapping
from pathlib import Path

import pytest

from chiffon_worker.metrics.drm_clients import (
    INCOMPLETE,
    DrmClientScanner,
    DrmScan,
    ProcTree,
    gpu_processes,
    parse_fdinfo,
    parse_size,
    region_bytes,
    scan_drm_clients,
)
from chiffon_worker.metrics.gpu_types import GpuProcess
from tests.fakes import procfs
from tests.fakes.procfs import Fd, Process

DGPU = "0000:03:00.0"
XE = "0000:07:00.0"
KIB = 1024
MIB = 1024 * 1024


class FakeClock:
    """Monotonic seconds that move only when told to (``step`` on every reading)."""

    def __init__(self, step: float = 0.0) -> None:
        self.now = 100.0
        self.step = step

    def __call__(self) -> float:
        value = self.now
        self.now += self.step
        return value


class CountingProc(ProcTree):
    """A real tree reader that counts the scans (listings of the process table)."""

    scans = 0

    def pids(self) -> list[int]:
        self.scans += 1
        return super().pids()


class DenyingProc(ProcTree):
    """Answers EACCES for some pids' fds, as procfs does for another user's process
    (tests run as root here, which file modes cannot deny)."""

    def __init__(self, root: str, denied: set[int]) -> None:
        super().__init__(root)
        self.denied = denied

    def dri_fds(self, pid: int) -> list[str]:
        if pid in self.denied:
            raise PermissionError(errno.EACCES, "Permission denied")
        return super().dri_fds(pid)


def vram_only(memory: Mapping[str, int]) -> int | None:
    return region_bytes(memory, ("vram",))


def scan(root: Path, clock: FakeClock | None = None, budget: float = 10.0) -> DrmScan:
    tick = clock or FakeClock()
    return scan_drm_clients(ProcTree(str(root)), tick.now + budget, tick)


def amd_process(pid: int, comm: str, *clients: tuple[int, str], fd_base: int = 10) -> Process:
    fds = tuple(Fd(fd_base + i, procfs.RENDER_NODE, procfs.amdgpu_fdinfo(DGPU, cid, vram))
                for i, (cid, vram) in enumerate(clients))
    return Process(pid, comm, procfs.STDIO + fds)


def test_a_client_open_through_several_fds_counts_once(tmp_path: Path) -> None:
    vram_kib = 524288
    root = procfs.write_proc(tmp_path, amd_process(4242, "ollama", (7, f"{vram_kib} KiB"),
                                                   (7, f"{vram_kib} KiB"),
                                                   (7, f"{vram_kib} KiB")))
    (process,) = scan(root).processes
    assert (process.pid, process.pdev, process.driver) == (4242, DGPU, "amdgpu")
    assert process.memory["vram"] == vram_kib * KIB


def test_distinct_clients_of_one_process_add_up(tmp_path: Path) -> None:
    first, second = 1048576, 262144
    root = procfs.write_proc(tmp_path, amd_process(4242, "ollama", (7, f"{first} KiB"),
                                                   (8, f"{second} KiB")))
    (process,) = scan(root).processes
    assert process.memory["vram"] == (first + second) * KIB


@pytest.mark.parametrize(("text", "expected"), [
    ("1234 KiB", 1234 * KIB), ("5 MiB", 5 * MIB), ("4096", 4096), ("0", 0),
], ids=["KiB", "MiB", "bytes", "zero"])
def test_sizes_convert_to_bytes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_unknown_size_unit_is_rejected() -> None:
    with pytest.raises(ValueError, match="unit"):
        parse_size("3 furlongs")


def test_memory_in_each_unit_is_read_from_fdinfo(tmp_path: Path) -> None:
    root = procfs.write_proc(
        tmp_path,
        amd_process(10, "kib", (1, "2048 KiB")),
        amd_process(11, "mib", (2, "3 MiB")),
        amd_process(12, "bytes", (3, "1048576")))
    memory = {p.name: p.memory["vram"] for p in scan(root).processes}
    assert memory == {"kib": 2048 * KIB, "mib": 3 * MIB, "bytes": 1048576}


def test_resident_size_is_preferred_over_total(tmp_path: Path) -> None:
    text = procfs.xe_fdinfo(XE, 4, total_vram0="51200 KiB", resident_vram0="40 MiB")
    client = parse_fdinfo(text)
    assert client is not None
    assert client.memory["vram0"] == 40 * MIB


def test_total_size_is_used_where_resident_is_not_told() -> None:
    client = parse_fdinfo("drm-driver:\ti915\ndrm-pdev:\t0000:03:00.0\n"
                          "drm-client-id:\t3\ndrm-total-local0:\t4194304 KiB\n")
    assert client is not None
    assert client.memory == {"local0": 4194304 * KIB}


def test_cycle_counters_are_not_taken_for_memory() -> None:
    client = parse_fdinfo(procfs.xe_fdinfo(XE, 4, "1 MiB", "1 MiB"))
    assert client is not None
    assert not any(region.startswith("cycles") for region in client.memory)


def test_fdinfo_without_a_drm_driver_is_not_a_client() -> None:
    assert parse_fdinfo(procfs.PLAIN_FDINFO) is None


def test_fds_that_are_not_dri_nodes_are_not_read(tmp_path: Path) -> None:
    # An NVIDIA fd (/dev/nvidia0): even DRM-looking fdinfo behind it is never read.
    decoy = procfs.amdgpu_fdinfo(DGPU, 9, "999 KiB")
    nvidia_fds = (Fd(5, "/dev/nvidiactl", decoy), Fd(6, "/dev/nvidia0", decoy))
    root = procfs.write_proc(tmp_path, Process(300, "nvidia-app",
                                               (*procfs.STDIO, *nvidia_fds)))
    assert scan(root).processes == ()


def test_clients_of_another_driver_are_not_this_gpus(tmp_path: Path) -> None:
    root = procfs.write_proc(
        tmp_path, amd_process(20, "game", (1, "1024 KiB")),
        Process(21, "chrome", (Fd(4, "/dev/dri/renderD129",
                                  procfs.xe_fdinfo(DGPU, 2, "1 MiB", "1 MiB")),)))
    result = scan(root)
    assert [p.pid for p in gpu_processes(result, DGPU, ("amdgpu",), vram_only)] == [20]


def test_processes_on_a_gpu_carry_name_and_memory_in_gib(tmp_path: Path) -> None:
    vram_kib = 3 * 1048576
    root = procfs.write_proc(tmp_path, amd_process(4242, "ollama", (7, f"{vram_kib} KiB")))
    processes = gpu_processes(scan(root), DGPU, ("amdgpu",), vram_only)
    assert processes == (GpuProcess(pid=4242, name="ollama",
                                    memory_gb=round(vram_kib * KIB / 2**30, 3)),)


def test_process_without_memory_keys_has_unknown_memory(tmp_path: Path) -> None:
    text = "drm-driver:\tamdgpu\ndrm-pdev:\t0000:03:00.0\ndrm-client-id:\t5\n"
    root = procfs.write_proc(tmp_path, Process(50, "old-kernel", (Fd(3, procfs.RENDER_NODE,
                                                                     text),)))
    (process,) = gpu_processes(scan(root), DGPU, ("amdgpu",), vram_only)
    assert process.memory_gb is None


def test_client_without_pdev_is_not_attributed_to_a_gpu(tmp_path: Path) -> None:
    text = "drm-driver:\tpanfrost\ndrm-client-id:\t14\ndrm-total-memory:\t290 MiB\n"
    root = procfs.write_proc(tmp_path, Process(60, "mali", (Fd(3, procfs.RENDER_NODE, text),)))
    assert scan(root).processes == ()


def test_unreadable_process_is_skipped_and_counted_hidden(tmp_path: Path) -> None:
    procfs.write_proc(tmp_path, amd_process(70, "mine", (1, "1024 KiB")),
                      amd_process(71, "theirs", (2, "2048 KiB")))
    clock = FakeClock()
    result = scan_drm_clients(DenyingProc(str(tmp_path), {71}), clock.now + 10, clock)
    assert [p.pid for p in result.processes] == [70]
    assert (result.hidden, result.error) == (1, None)


def test_process_that_exits_during_the_scan_is_skipped_silently(tmp_path: Path) -> None:
    root = procfs.write_proc(tmp_path, amd_process(80, "gone", (1, "1024 KiB")),
                             amd_process(81, "here", (2, "1024 KiB")))
    for entry in (root / "80" / "fd").iterdir():
        entry.unlink()
    (root / "80" / "fd").rmdir()  # as if it exited between listing /proc and its fds
    result = scan(root)
    assert [p.pid for p in result.processes] == [81]
    assert (result.hidden, result.error) == (0, None)


def test_scan_past_its_deadline_reports_itself_incomplete(tmp_path: Path) -> None:
    root = procfs.write_proc(tmp_path, amd_process(90, "first", (1, "1024 KiB")),
                             amd_process(91, "second", (2, "1024 KiB")))
    clock = FakeClock(step=1.0)  # each look at the clock costs a second
    result = scan_drm_clients(ProcTree(str(root)), clock.now + 0.5, clock)
    assert result.error == INCOMPLETE
    assert [p.pid for p in result.processes] == [90]


def test_unlistable_proc_root_is_an_error(tmp_path: Path) -> None:
    result = scan(tmp_path / "missing")
    assert result.error is not None and result.error.startswith("cannot list")


def test_scan_is_reused_within_min_interval(tmp_path: Path) -> None:
    root = procfs.write_proc(tmp_path)
    clock = FakeClock()
    proc = CountingProc(str(root))
    scanner = DrmClientScanner(min_interval_s=5.0, clock=clock, proc=proc)
    scanner.scan()
    clock.now += 4.9
    scanner.scan()
    assert proc.scans == 1
    clock.now += 0.1
    scanner.scan()
    assert proc.scans == 2


def test_process_started_within_min_interval_shows_on_the_next_scan(tmp_path: Path) -> None:
    root = procfs.write_proc(tmp_path)
    clock = FakeClock()
    scanner = DrmClientScanner(str(root), min_interval_s=5.0, clock=clock)
    assert scanner.scan().processes == ()
    procfs.write_process(root, amd_process(95, "late", (1, "1024 KiB")))
    assert scanner.scan().processes == ()
    clock.now += 5.0
    assert [p.pid for p in scanner.scan().processes] == [95]
