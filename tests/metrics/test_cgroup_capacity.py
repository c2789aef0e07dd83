"""Capacity that stays true in containers: CPU busy cores from the cgroup's own usage rate,
memory available from the cgroup's working set, on recorded v2 and v1 trees.

Every expected number is computed here from the fixture's values (quota, CPU time used, wall
time stepped on a fake clock, bytes), never copied from the code's output.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from chiffon_worker.metrics.cgroup import parse_cpu_list
from chiffon_worker.metrics.cpu import CpuMetrics
from chiffon_worker.metrics.memory import MemoryMetrics
from tests.fakes.cgroup_tree import V2_CONTAINER, CgroupTree, cpu_stat, memory_stat

USEC_PER_S = 1_000_000
NSEC_PER_S = 1_000_000_000
GIB = 2**30
PERIOD_US = 100_000
#: What v1 writes for "no memory limit" on x86-64.
V1_UNLIMITED = 9223372036854771712

HOST_LOGICAL = 64
HOST_PHYSICAL = 32
BUSY_HOST_LOAD = (60.0, 58.0, 50.0)
#: The container's CPU time counter when the agent starts (it has run for a while).
START_USEC = 7_000_000

HOST_TOTAL = 32 * GIB
HOST_AVAILABLE = 20 * GIB
LIMIT = 4 * GIB
USAGE = 3 * GIB + GIB // 2
INACTIVE = 2 * GIB

WriteUsage = Callable[[int], object]


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeVm:
    """What psutil.virtual_memory() returns, reduced to the fields read."""

    def __init__(self, total: int, available: int) -> None:
        self.total = total
        self.available = available


@pytest.fixture
def busy_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64-thread (32-core) host, load 60, whose whole CPU set is in our affinity mask."""
    monkeypatch.setattr(psutil, "cpu_count",
                        lambda logical=True: HOST_LOGICAL if logical else HOST_PHYSICAL)
    monkeypatch.setattr(psutil, "getloadavg", lambda: BUSY_HOST_LOAD)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(HOST_LOGICAL)),
                        raising=False)


@pytest.fixture
def host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host with 32 GiB, 20 GiB of it available."""
    monkeypatch.setattr(psutil, "virtual_memory", lambda: FakeVm(HOST_TOTAL, HOST_AVAILABLE))


def v2_container(tmp_path: Path, cpus: float) -> CgroupTree:
    """A v2 container (``0::/kubepods/pod1/ctr``) with a CPU quota of ``cpus``."""
    tree = CgroupTree.v2(tmp_path)
    tree.write("cpu.max", f"{round(cpus * PERIOD_US)} {PERIOD_US}")
    return tree


def v2_usage(tree: CgroupTree) -> WriteUsage:
    """Writes the container's v2 ``cpu.stat`` with ``usage_usec`` = its argument."""
    return lambda usec: tree.write("cpu.stat", cpu_stat(usec))


def sample_after(metrics: CpuMetrics, clock: FakeClock, write_usage: WriteUsage,
                 used: int, seconds: float, start: int = START_USEC) -> dict[str, Any]:
    """Sample at counter ``start``, let ``seconds`` pass while ``used`` units of CPU time are
    spent, and return the second sample."""
    write_usage(start)
    metrics.sample()
    clock.advance(seconds)
    write_usage(start + used)
    return metrics.sample()


def cpu_metrics(tree: CgroupTree, clock: FakeClock) -> CpuMetrics:
    """The agent's CPU source reading ``tree`` on ``clock``."""
    return CpuMetrics(tree.sysfs_root, tree.proc_root, clock=clock)


# -- CPU: busy cores from the cgroup's own usage ---------------------------------------------


def test_an_idle_container_on_a_busy_host_reports_its_own_usage(
        tmp_path: Path, busy_host: None) -> None:
    cpus, used_usec, seconds = 2.0, 50_000, 1.0
    tree = v2_container(tmp_path, cpus)
    clock = FakeClock()
    sample = sample_after(cpu_metrics(tree, clock), clock, v2_usage(tree), used_usec, seconds)
    busy = used_usec / USEC_PER_S / seconds
    assert (sample["cpu_busy_source"], sample["cpu_cores_busy"],
            sample["cpu_cores_available"]) == ("cgroup", round(busy, 2), round(cpus - busy, 2))


def test_busy_cores_are_cpu_seconds_used_per_wall_second(
        tmp_path: Path, busy_host: None) -> None:
    cpus, used_usec, seconds = 2.0, 1 * USEC_PER_S, 4.0
    tree = v2_container(tmp_path, cpus)
    clock = FakeClock()
    sample = sample_after(cpu_metrics(tree, clock), clock, v2_usage(tree), used_usec, seconds)
    assert sample["cpu_cores_busy"] == round(used_usec / USEC_PER_S / seconds, 2)


def test_a_busy_container_keeps_one_core_available(tmp_path: Path, busy_host: None) -> None:
    cpus, used_usec, seconds = 2.0, 3 * USEC_PER_S, 2.0
    tree = v2_container(tmp_path, cpus)
    clock = FakeClock()
    sample = sample_after(cpu_metrics(tree, clock), clock, v2_usage(tree), used_usec, seconds)
    busy, floor = used_usec / USEC_PER_S / seconds, min(1.0, cpus)
    assert cpus - busy < floor  # the fixture reaches the floor
    assert (sample["cpu_cores_busy"], sample["cpu_cores_available"]) == (round(busy, 2), floor)


@pytest.mark.parametrize("used_fraction", [0.0, 0.5, 1.0, 1.2])
def test_a_half_cpu_quota_never_reports_more_than_half_a_core(
        tmp_path: Path, busy_host: None, used_fraction: float) -> None:
    cpus, seconds = 0.5, 1.0
    tree = v2_container(tmp_path, cpus)
    clock = FakeClock()
    used_usec = round(used_fraction * cpus * seconds * USEC_PER_S)
    sample = sample_after(cpu_metrics(tree, clock), clock, v2_usage(tree), used_usec, seconds)
    assert sample["cpu_cores_available"] == cpus


def test_busy_cores_never_exceed_the_quota(tmp_path: Path, busy_host: None) -> None:
    cpus, seconds = 2.0, 1.0
    tree = v2_container(tmp_path, cpus)
    clock = FakeClock()
    used_usec = round(1.1 * cpus * seconds * USEC_PER_S)  # accounting jitter past the quota
    sample = sample_after(cpu_metrics(tree, clock), clock, v2_usage(tree), used_usec, seconds)
    assert sample["cpu_cores_busy"] == cpus


def test_the_first_sample_in_a_container_takes_the_load_capped_at_the_quota(
        tmp_path: Path, busy_host: None) -> None:
    cpus = 2.0
    tree = v2_container(tmp_path, cpus)
    v2_usage(tree)(START_USEC)
    sample = cpu_metrics(tree, FakeClock()).sample()
    busy = min(BUSY_HOST_LOAD[0], cpus)
    assert (sample["cpu_busy_source"], sample["cpu_cores_busy"],
            sample["cpu_cores_available"]) == ("load", busy, max(min(1.0, cpus), cpus - busy))


def test_load_averages_stay_the_hosts_when_busy_cores_come_from_the_cgroup(
        tmp_path: Path, busy_host: None) -> None:
    tree = v2_container(tmp_path, 2.0)
    clock = FakeClock()
    sample = sample_after(cpu_metrics(tree, clock), clock, v2_usage(tree), 50_000, 1.0)
    assert sample["cpu_busy_source"] == "cgroup"
    assert (sample["cpu_load_1min"], sample["cpu_load_5min"],
            sample["cpu_load_15min"]) == BUSY_HOST_LOAD


def test_usage_comes_from_the_deepest_cgroup_holding_cpu_stat(
        tmp_path: Path, busy_host: None) -> None:
    tree = v2_container(tmp_path, 2.0)
    pod = V2_CONTAINER.rsplit("/", 1)[0]
    clock = FakeClock()
    own_used_usec, seconds = 100_000, 1.0

    def write_both(usec: int) -> None:
        tree.write("cpu.stat", cpu_stat(usec * 9), path=pod)  # the pod's moves 9x as fast
        tree.write("cpu.stat", cpu_stat(usec))

    sample = sample_after(cpu_metrics(tree, clock), clock, write_both, own_used_usec, seconds)
    assert sample["cpu_cores_busy"] == round(own_used_usec / USEC_PER_S / seconds, 2)


def test_v1_quota_and_cpuacct_usage_in_nanoseconds(tmp_path: Path, busy_host: None) -> None:
    quota_us, used_ns, seconds = 150_000, 300_000_000, 1.0
    tree = CgroupTree.v1(tmp_path)
    tree.write("cpu.cfs_quota_us", quota_us, "cpu,cpuacct")
    tree.write("cpu.cfs_period_us", PERIOD_US, "cpu,cpuacct")
    clock = FakeClock()
    sample = sample_after(cpu_metrics(tree, clock), clock,
                          lambda ns: tree.write("cpuacct.usage", ns, "cpu,cpuacct"),
                          used_ns, seconds, start=START_USEC * 1000)
    cpus, busy = quota_us / PERIOD_US, used_ns / NSEC_PER_S / seconds
    assert (sample["cpu_busy_source"], sample["cpu_cores_busy"],
            sample["cpu_cores_available"]) == ("cgroup", round(busy, 2), round(cpus - busy, 2))


def test_v1_cpuacct_mounted_apart_from_cpu(tmp_path: Path, busy_host: None) -> None:
    used_ns, seconds = 250_000_000, 1.0
    tree = CgroupTree.v1(tmp_path, controllers=("cpu", "cpuacct"))
    tree.write("cpu.cfs_quota_us", 2 * PERIOD_US, "cpu")
    tree.write("cpu.cfs_period_us", PERIOD_US, "cpu")
    clock = FakeClock()
    sample = sample_after(cpu_metrics(tree, clock), clock,
                          lambda ns: tree.write("cpuacct.usage", ns, "cpuacct"),
                          used_ns, seconds)
    assert sample["cpu_cores_busy"] == round(used_ns / NSEC_PER_S / seconds, 2)


def test_an_affinity_narrower_than_the_host_uses_the_cgroup_usage(
        tmp_path: Path, busy_host: None, monkeypatch: pytest.MonkeyPatch) -> None:
    allowed = {0, 1}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: allowed, raising=False)
    tree = CgroupTree.v2(tmp_path)
    clock = FakeClock()
    sample = sample_after(cpu_metrics(tree, clock), clock, v2_usage(tree), 50_000, 1.0)
    assert (sample["cpu_busy_source"], sample["cpu_cores_effective"]) == ("cgroup", len(allowed))


def test_a_cpuset_narrower_than_the_host_uses_the_cgroup_usage(
        tmp_path: Path, busy_host: None) -> None:
    cpus = [0, 1, 2]
    tree = CgroupTree.v2(tmp_path)
    tree.write("cpuset.cpus.effective", f"{cpus[0]}-{cpus[-1]}")
    clock = FakeClock()
    sample = sample_after(cpu_metrics(tree, clock), clock, v2_usage(tree), 50_000, 1.0)
    assert (sample["cpu_busy_source"], sample["cpu_cores_effective"]) == ("cgroup", len(cpus))


# -- CPU: bare metal keeps today's rule ------------------------------------------------------


@pytest.mark.parametrize("load", [BUSY_HOST_LOAD, (2.0, 1.5, 1.0)])
def test_bare_metal_reports_max_one_core_or_cores_minus_load(
        tmp_path: Path, busy_host: None, monkeypatch: pytest.MonkeyPatch,
        load: tuple[float, float, float]) -> None:
    monkeypatch.setattr(psutil, "getloadavg", lambda: load)
    sample = CpuMetrics(str(tmp_path / "sys"), str(tmp_path / "proc"),
                        clock=FakeClock()).sample()
    assert (sample["cpu_busy_source"], sample["cpu_cores_busy"],
            sample["cpu_cores_available"]) == ("load", load[0],
                                               max(1.0, HOST_PHYSICAL - load[0]))


def test_a_host_without_quota_ignores_its_cgroup_usage(tmp_path: Path,
                                                       busy_host: None) -> None:
    tree = CgroupTree.v2(tmp_path, "/")
    tree.write("cpu.max", f"max {PERIOD_US}")
    tree.write("cpuset.cpus.effective", f"0-{HOST_LOGICAL - 1}")
    clock = FakeClock()
    sample = sample_after(cpu_metrics(tree, clock), clock, v2_usage(tree), 50_000, 1.0)
    assert (sample["cpu_busy_source"], sample["cpu_cores_available"]) == (
        "load", max(1.0, HOST_PHYSICAL - BUSY_HOST_LOAD[0]))


# -- CPU: unreadable usage falls back to the load ----------------------------------------------


@pytest.mark.parametrize("cpu_stat_text", [
    None, "garbage", "user_usec 5\nsystem_usec 5", "usage_usec lots", "usage_usec -5"])
def test_missing_or_garbage_usage_falls_back_to_the_capped_load(
        tmp_path: Path, busy_host: None, cpu_stat_text: str | None) -> None:
    cpus = 2.0
    tree = v2_container(tmp_path, cpus)
    clock = FakeClock()

    def write_text(_usec: int) -> None:
        if cpu_stat_text is not None:
            tree.write("cpu.stat", cpu_stat_text)

    sample = sample_after(cpu_metrics(tree, clock), clock, write_text, 50_000, 1.0)
    assert (sample["cpu_busy_source"], sample["cpu_cores_busy"]) == (
        "load", min(BUSY_HOST_LOAD[0], cpus))


def test_an_unreadable_usage_file_falls_back_to_the_load(
        tmp_path: Path, busy_host: None) -> None:
    tree = v2_container(tmp_path, 2.0)
    v2_usage(tree)(START_USEC)
    clock = FakeClock()
    metrics = cpu_metrics(tree, clock)
    metrics.sample()
    stat = tree.directory() / "cpu.stat"
    stat.unlink()
    stat.mkdir()  # reading it now fails with IsADirectoryError
    clock.advance(1.0)
    assert metrics.sample()["cpu_busy_source"] == "load"


def test_a_garbage_reading_between_good_ones_falls_back_to_the_load(
        tmp_path: Path, busy_host: None) -> None:
    tree = v2_container(tmp_path, 2.0)
    clock = FakeClock()
    metrics = cpu_metrics(tree, clock)
    v2_usage(tree)(START_USEC)
    metrics.sample()
    clock.advance(1.0)
    tree.write("cpu.stat", "usage_usec")
    assert metrics.sample()["cpu_busy_source"] == "load"


def test_after_a_garbage_reading_the_rate_restarts_from_the_next_good_one(
        tmp_path: Path, busy_host: None) -> None:
    tree = v2_container(tmp_path, 2.0)
    clock = FakeClock()
    metrics = cpu_metrics(tree, clock)
    tree.write("cpu.stat", "garbage")
    metrics.sample()
    clock.advance(1.0)
    used_usec, seconds = 400_000, 2.0
    sample = sample_after(metrics, clock, v2_usage(tree), used_usec, seconds)
    assert (sample["cpu_busy_source"], sample["cpu_cores_busy"]) == (
        "cgroup", round(used_usec / USEC_PER_S / seconds, 2))


def test_a_counter_that_went_backwards_falls_back_to_the_load(
        tmp_path: Path, busy_host: None) -> None:
    tree = v2_container(tmp_path, 2.0)
    clock = FakeClock()
    sample = sample_after(cpu_metrics(tree, clock), clock, v2_usage(tree), -START_USEC // 2, 1.0)
    assert sample["cpu_busy_source"] == "load"


@pytest.mark.parametrize(("text", "count"), [
    ("0-3,8", len([0, 1, 2, 3, 8])), ("5", 1), ("0-63", HOST_LOGICAL), ("", None),
    ("3-1", None), ("0-x", None)])
def test_cpu_lists_count_the_cpus_they_name(text: str, count: int | None) -> None:
    assert parse_cpu_list(text) == count


# -- memory: available = limit - working set -------------------------------------------------


def memory_sample(tree: CgroupTree) -> dict[str, Any]:
    """One memory sample of the agent in ``tree``."""
    return MemoryMetrics(tree.sysfs_root, tree.proc_root).sample()


def v2_memory(tmp_path: Path, limit: int | str = LIMIT, usage: int = USAGE,
              stat: str | None = None) -> CgroupTree:
    """A v2 container with a memory limit, usage and (when given) ``memory.stat``."""
    tree = CgroupTree.v2(tmp_path)
    tree.write("memory.max", limit)
    tree.write("memory.current", usage)
    if stat is not None:
        tree.write("memory.stat", stat)
    return tree


def v1_memory(tmp_path: Path, limit: int = LIMIT, stat: str | None = None) -> CgroupTree:
    """A v1 container with a memory limit, usage ``USAGE`` and (when given) ``memory.stat``."""
    tree = CgroupTree.v1(tmp_path)
    tree.write("memory.limit_in_bytes", limit, "memory")
    tree.write("memory.usage_in_bytes", USAGE, "memory")
    if stat is not None:
        tree.write("memory.stat", stat, "memory")
    return tree


def test_v2_available_memory_is_the_limit_less_the_working_set(
        tmp_path: Path, host_memory: None) -> None:
    sample = memory_sample(v2_memory(tmp_path, stat=memory_stat(inactive_file=INACTIVE)))
    assert sample["memory_available_gb"] == (LIMIT - (USAGE - INACTIVE)) / GIB


def test_v2_total_memory_is_the_limit(tmp_path: Path, host_memory: None) -> None:
    sample = memory_sample(v2_memory(tmp_path, stat=memory_stat(inactive_file=INACTIVE)))
    assert sample["memory_total_gb"] == LIMIT / GIB


def test_v1_working_set_subtracts_total_inactive_file(
        tmp_path: Path, host_memory: None) -> None:
    stat = memory_stat(inactive_file=INACTIVE // 4, total_inactive_file=INACTIVE)
    sample = memory_sample(v1_memory(tmp_path, stat=stat))
    assert sample["memory_available_gb"] == (LIMIT - (USAGE - INACTIVE)) / GIB


def test_v1_without_total_inactive_file_subtracts_inactive_file(
        tmp_path: Path, host_memory: None) -> None:
    sample = memory_sample(v1_memory(tmp_path, stat=memory_stat(inactive_file=INACTIVE)))
    assert sample["memory_available_gb"] == (LIMIT - (USAGE - INACTIVE)) / GIB


@pytest.mark.parametrize("stat", [None, "garbage", "inactive_file lots", "inactive_file -1"])
def test_an_unreadable_inactive_file_leaves_usage_as_the_working_set(
        tmp_path: Path, host_memory: None, stat: str | None) -> None:
    sample = memory_sample(v2_memory(tmp_path, stat=stat))
    assert sample["memory_available_gb"] == (LIMIT - USAGE) / GIB


def test_inactive_file_above_usage_makes_the_whole_limit_available(
        tmp_path: Path, host_memory: None) -> None:
    sample = memory_sample(v2_memory(tmp_path, stat=memory_stat(inactive_file=USAGE + GIB)))
    assert sample["memory_available_gb"] == LIMIT / GIB


def test_available_memory_never_exceeds_the_hosts_available(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host_available = GIB
    monkeypatch.setattr(psutil, "virtual_memory", lambda: FakeVm(HOST_TOTAL, host_available))
    sample = memory_sample(v2_memory(tmp_path, stat=memory_stat(inactive_file=INACTIVE)))
    assert host_available < LIMIT - (USAGE - INACTIVE)  # the host is the tighter one
    assert sample["memory_available_gb"] == host_available / GIB


def test_memory_percent_is_the_working_set_share_of_the_limit(
        tmp_path: Path, host_memory: None) -> None:
    sample = memory_sample(v2_memory(tmp_path, stat=memory_stat(inactive_file=INACTIVE)))
    assert sample["memory_percent"] == round(100 * (USAGE - INACTIVE) / LIMIT, 1)


def test_memory_stat_is_read_beside_the_limited_cgroups_usage(
        tmp_path: Path, host_memory: None) -> None:
    tree = CgroupTree.v2(tmp_path)
    pod = V2_CONTAINER.rsplit("/", 1)[0]
    tree.write("memory.max", LIMIT, path=pod)
    tree.write("memory.current", USAGE, path=pod)
    tree.write("memory.stat", memory_stat(inactive_file=INACTIVE), path=pod)
    tree.write("memory.stat", memory_stat(inactive_file=INACTIVE // 8))  # the container's own
    assert memory_sample(tree)["memory_available_gb"] == (LIMIT - (USAGE - INACTIVE)) / GIB


@pytest.mark.parametrize("make_tree", [
    lambda path: v2_memory(path, limit="max", stat=memory_stat(inactive_file=INACTIVE)),
    lambda path: v1_memory(path, limit=V1_UNLIMITED, stat=memory_stat(inactive_file=INACTIVE)),
    lambda path: v1_memory(path, limit=2**62, stat=memory_stat(inactive_file=INACTIVE)),
], ids=["v2-max", "v1-9223372036854771712", "v1-2**62"])
def test_an_unlimited_cgroup_reports_the_hosts_memory(
        tmp_path: Path, host_memory: None, make_tree: Callable[[Path], CgroupTree]) -> None:
    sample = memory_sample(make_tree(tmp_path))
    assert (sample["memory_total_gb"], sample["memory_available_gb"]) == (
        HOST_TOTAL / GIB, HOST_AVAILABLE / GIB)
