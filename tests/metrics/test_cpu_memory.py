"""CPU and memory metrics against recorded cgroup trees (v1 and v2) under a fake sysfs root."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
import pytest

from chiffon_worker.metrics import cpu as cpu_module
from chiffon_worker.metrics.cgroup import CgroupLimits
from chiffon_worker.metrics.cpu import CpuMetrics, physical_cores
from chiffon_worker.metrics.memory import MemoryMetrics

GIB = 2**30
V1_UNLIMITED = "9223372036854771712"


def tree(root: Path, files: dict[str, str]) -> Path:
    """Write ``files`` (paths relative to ``root``) and return root."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


def no_proc(tmp_path: Path) -> str:
    """A procfs root with no /self/cgroup: the hierarchy's root is this process's cgroup."""
    return str(tmp_path / "noproc")


@pytest.fixture
def eight_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with 8 physical cores, all in our affinity mask, load 2.0."""
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 16 if logical else 8)
    monkeypatch.setattr(psutil, "getloadavg", lambda: (2.0, 1.5, 1.0))
    monkeypatch.setattr(cpu_module, "_affinity_count", lambda: 16)


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"fs/cgroup/cpu.max": "150000 100000"}, 1.5),
        ({"fs/cgroup/cpu.max": "max 100000"}, None),
        ({"fs/cgroup/cpu.max": "garbage"}, None),
        ({"fs/cgroup/cpu/cpu.cfs_quota_us": "-1",
          "fs/cgroup/cpu/cpu.cfs_period_us": "100000"}, None),
        ({"fs/cgroup/cpu/cpu.cfs_quota_us": "200000",
          "fs/cgroup/cpu/cpu.cfs_period_us": "100000"}, 2.0),
        ({"fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "50000",
          "fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000"}, 0.5),
        ({}, None),
    ],
)
def test_cpu_quota_from_cgroup_tree(tmp_path: Path, files: dict[str, str],
                                    quota: float | None) -> None:
    root = tree(tmp_path / "sys", files)
    assert CgroupLimits(str(root), no_proc(tmp_path)).cpu_quota() == quota


def test_nested_v2_limit_takes_the_tightest_on_the_path(tmp_path: Path) -> None:
    root = tree(tmp_path / "sys", {"fs/cgroup/cpu.max": "400000 100000",
                                   "fs/cgroup/app.slice/cpu.max": "250000 100000"})
    proc = tree(tmp_path / "proc", {"self/cgroup": "0::/app.slice"})
    assert CgroupLimits(str(root), str(proc)).cpu_quota() == 2.5


def test_one_and_a_half_cpu_quota_gives_effective_cores(
        tmp_path: Path, eight_cores: None) -> None:
    root = tree(tmp_path / "sys", {"fs/cgroup/cpu.max": "150000 100000"})
    sample = CpuMetrics(str(root), no_proc(tmp_path)).sample()
    assert sample["cpu_cores_physical"] == 8
    assert sample["cpu_cores_effective"] == 1.5
    assert sample["cpu_cores_available"] == 1.0  # max(min(1, 1.5), 1.5 - min(2.0, 1.5))


def test_available_cores_are_effective_minus_load(tmp_path: Path, eight_cores: None) -> None:
    sample = CpuMetrics(str(tmp_path / "sys"), no_proc(tmp_path)).sample()
    assert sample["cpu_cores_effective"] == 8
    assert sample["cpu_cores_available"] == 6.0
    assert (sample["cpu_load_1min"], sample["cpu_load_5min"], sample["cpu_load_15min"]) == (
        2.0, 1.5, 1.0)


def test_affinity_caps_effective_cores(tmp_path: Path, eight_cores: None,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_module, "_affinity_count", lambda: 4)
    assert CpuMetrics(str(tmp_path / "sys"), no_proc(tmp_path)).effective_cores() == 4


def test_physical_cores_fall_back_to_logical_when_psutil_returns_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 12 if logical else None)
    assert physical_cores() == 12


def test_physical_cores_is_at_least_one_when_psutil_knows_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: None)
    assert physical_cores() == 1


def test_cpu_percent_never_sleeps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Any] = []

    def fake_percent(interval: Any = None) -> float:
        calls.append(interval)
        return 37.5

    monkeypatch.setattr(psutil, "cpu_percent", fake_percent)
    metrics = CpuMetrics(str(tmp_path), no_proc(tmp_path))
    metrics.sample()
    assert metrics.sample()["cpu_percent"] == 37.5
    assert calls == [None, None]


def test_first_cpu_percent_is_the_average_since_boot(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    times = psutil._pslinux.scputimes(  # type: ignore[attr-defined]
        user=300.0, nice=0.0, system=100.0, idle=500.0, iowait=100.0, irq=0.0, softirq=0.0,
        steal=0.0, guest=0.0, guest_nice=0.0)
    monkeypatch.setattr(psutil, "cpu_times", lambda: times)
    assert CpuMetrics(str(tmp_path), no_proc(tmp_path)).sample()["cpu_percent"] == 40.0


class FakeVm:
    def __init__(self, total: int, available: int) -> None:
        self.total = total
        self.available = available


@pytest.mark.parametrize(
    ("files", "host_total", "host_available", "total_gb", "available_gb"),
    [
        ({}, 32 * GIB, 20 * GIB, 32.0, 20.0),
        ({"fs/cgroup/memory.max": str(4 * GIB), "fs/cgroup/memory.current": str(GIB)},
         32 * GIB, 20 * GIB, 4.0, 3.0),
        ({"fs/cgroup/memory.max": "max", "fs/cgroup/memory.current": str(GIB)},
         32 * GIB, 20 * GIB, 32.0, 20.0),
        ({"fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
          "fs/cgroup/memory/memory.usage_in_bytes": str(GIB)}, 32 * GIB, 20 * GIB, 32.0, 20.0),
        ({"fs/cgroup/memory/memory.limit_in_bytes": str(8 * GIB),
          "fs/cgroup/memory/memory.usage_in_bytes": str(6 * GIB)}, 32 * GIB, 20 * GIB,
         8.0, 2.0),
        # a limit above the host's memory changes nothing
        ({"fs/cgroup/memory.max": str(64 * GIB)}, 32 * GIB, 20 * GIB, 32.0, 20.0),
        # host memory tighter than the cgroup's headroom wins
        ({"fs/cgroup/memory.max": str(16 * GIB), "fs/cgroup/memory.current": str(GIB)},
         32 * GIB, 3 * GIB, 16.0, 3.0),
    ],
)
def test_memory_is_capped_by_cgroup_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str],
        host_total: int, host_available: int, total_gb: float, available_gb: float) -> None:
    monkeypatch.setattr(psutil, "virtual_memory", lambda: FakeVm(host_total, host_available))
    root = tree(tmp_path / "sys", files)
    sample = MemoryMetrics(str(root), no_proc(tmp_path)).sample()
    assert sample["memory_total_gb"] == total_gb
    assert sample["memory_available_gb"] == available_gb
    assert sample["memory_percent"] == round(100 * (total_gb - available_gb) / total_gb, 1)


def test_this_machine_reports_sane_numbers() -> None:
    cpu = CpuMetrics().sample()
    memory = MemoryMetrics().sample()
    assert 1 <= cpu["cpu_cores_physical"] <= 4096
    # under a quota below one CPU the floor is the quota, not one core
    assert cpu["cpu_cores_available"] >= min(1.0, cpu["cpu_cores_effective"])
    assert cpu["cpu_busy_source"] in ("load", "cgroup")
    assert 0 < memory["memory_available_gb"] <= memory["memory_total_gb"]
