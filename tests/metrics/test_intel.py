"""Intel source: xe and i915 cards are present, VRAM unknown unless the driver tells;
power limit from hwmon, processes from DRM fdinfo."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from chiffon_worker.errors import GpuSourceUnavailable
from chiffon_worker.metrics.gpu import GpuMetrics, GpuProber
from chiffon_worker.metrics.gpu_snapshot import gpu_keys
from chiffon_worker.metrics.gpu_types import GpuDevice, GpuProcess
from chiffon_worker.metrics.intel import IntelSysfsSource
from chiffon_worker.metrics.nvml import NvmlSource
from tests.fakes import fake_pynvml as fnv
from tests.fakes import procfs, sysfs
from tests.fakes.procfs import Fd, Process

XE = sysfs.INTEL_XE_CARD0
I915 = sysfs.INTEL_I915_CARD1
KIB = 1024
MIB = 1024 * 1024


def gib(n_bytes: int) -> float:
    return round(n_bytes / 2**30, 3)


def watts(microwatts: int) -> float:
    return round(microwatts / 1e6, 1)


@pytest.fixture
def proc_root(tmp_path: Path) -> str:
    """An empty procfs: no process has a GPU open."""
    return str(procfs.write_proc(tmp_path / "proc"))


def source(root: str | Path, proc_root: str) -> IntelSysfsSource:
    return IntelSysfsSource(str(root), proc_root=proc_root)


def read_one(tmp_path: Path, card: sysfs.Card, proc_root: str) -> GpuDevice:
    (device,) = source(sysfs.write_tree(tmp_path / "sys", card), proc_root).read()
    return device


@pytest.fixture
def xe_and_i915(tmp_path: Path) -> str:
    return str(sysfs.write_tree(tmp_path, XE, I915))


def test_xe_card_is_named_from_its_device_id_with_unknown_vram(xe_and_i915: str,
                                                               proc_root: str) -> None:
    xe = source(xe_and_i915, proc_root).read()[0]
    assert (xe.index, xe.vendor, xe.name, xe.source) == (0, "intel", "Intel GPU 0xe20b",
                                                         "intel-sysfs")
    assert (xe.vram_total_gb, xe.vram_available_gb) == (None, None)


def test_xe_temperature_comes_from_temp2_input(xe_and_i915: str, proc_root: str) -> None:
    assert source(xe_and_i915, proc_root).read()[0].temperature_c == XE.hwmon["temp2_input"] / 1000


def test_i915_integrated_card_is_present_without_temperature(xe_and_i915: str,
                                                             proc_root: str) -> None:
    i915 = source(xe_and_i915, proc_root).read()[1]
    assert (i915.index, i915.name, i915.temperature_c, i915.error) == (
        1, "Intel GPU 0x46a6", None, None)


def test_connector_entries_are_skipped(xe_and_i915: str, proc_root: str) -> None:
    assert len(source(xe_and_i915, proc_root).read()) == 2


def test_temp1_input_is_used_when_there_is_no_temp2(tmp_path: Path, proc_root: str) -> None:
    root = sysfs.write_tree(tmp_path, replace(XE, hwmon={"temp1_input": 52500}))
    assert source(str(root), proc_root).read()[0].temperature_c == 52.5


def test_xe_tile_vram_sizes_are_summed_when_exposed(tmp_path: Path, proc_root: str) -> None:
    # Hypothetical two-tile card: xe exposes tile<N>/physical_vram_size_bytes per tile.
    tile = 12 * 2**30
    card = replace(XE, files={"tile0/physical_vram_size_bytes": tile,
                              "tile1/physical_vram_size_bytes": tile})
    (xe,) = IntelSysfsSource(str(sysfs.write_tree(tmp_path, card))).read()
    assert (xe.vram_total_gb, xe.vram_available_gb) == (gib(2 * tile), None)


def test_mem_info_vram_total_is_used_when_exposed(tmp_path: Path, proc_root: str) -> None:
    card = replace(XE, attrs={"mem_info_vram_total": 17179869184})
    (xe,) = IntelSysfsSource(str(sysfs.write_tree(tmp_path, card))).read()
    assert xe.vram_total_gb == 16.0


def test_no_intel_card_is_unavailable(tmp_path: Path, proc_root: str) -> None:
    root = sysfs.write_tree(tmp_path, sysfs.AMD_DGPU_CARD1)
    with pytest.raises(GpuSourceUnavailable):
        source(str(root), proc_root).read()


def test_unreadable_card_carries_its_own_error(tmp_path: Path, proc_root: str) -> None:
    root = sysfs.write_tree(tmp_path, XE, I915)
    broken = root / "bus" / "pci" / "devices" / XE.pci_address / "device"
    broken.unlink()
    broken.mkdir()
    xe, i915 = source(str(root), proc_root).read()
    assert xe.error is not None and xe.error.startswith("card0:")
    assert i915.error is None


def test_snapshot_of_intel_only_machine_has_type_intel_and_zero_vram(
        xe_and_i915: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        proc_root: str) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi, no rocm-smi
    gpu = GpuMetrics(prober=GpuProber(xe_and_i915,
                                      nvml=NvmlSource(load=fnv.unavailable_loader),
                                      intel=source(xe_and_i915, proc_root)))
    try:
        keys = gpu_keys(gpu.sample())
    finally:
        gpu.close()
    assert (keys["gpu_type"], keys["gpu_count"]) == ("intel", 2)
    assert (keys["gpu_vram_total_gb"], keys["gpu_vram_available_gb"]) == (0.0, 0.0)
    assert keys["gpus"][0]["name"] == "Intel GPU 0xe20b"
    assert keys["gpu_probe"]["state"] == "ok"


# -- power -------------------------------------------------------------------------------

def test_xe_power_limit_comes_from_power1_max(tmp_path: Path, proc_root: str) -> None:
    xe = read_one(tmp_path, XE, proc_root)
    assert xe.power_limit_w == watts(XE.hwmon["power1_max"])


def test_power_draw_is_unknown_even_with_an_energy_counter(tmp_path: Path,
                                                           proc_root: str) -> None:
    xe = read_one(tmp_path, XE, proc_root)
    assert "energy1_input" in XE.hwmon
    assert (xe.power_draw_w, xe.field_errors) == (None, ())


def test_zero_power1_max_is_no_limit(tmp_path: Path, proc_root: str) -> None:
    xe = read_one(tmp_path, replace(XE, hwmon={**XE.hwmon, "power1_max": 0}), proc_root)
    assert xe.power_limit_w is None


def test_card_without_hwmon_has_no_power_figures_and_no_error(tmp_path: Path,
                                                              proc_root: str) -> None:
    i915 = read_one(tmp_path, I915, proc_root)
    assert (i915.power_draw_w, i915.power_limit_w, i915.field_errors) == (None, None, ())


def test_unreadable_power_limit_is_a_field_error(tmp_path: Path, proc_root: str) -> None:
    root = sysfs.write_tree(tmp_path / "sys", XE)
    broken = root / "bus/pci/devices" / XE.pci_address / "hwmon/hwmon0/power1_max"
    broken.unlink()
    broken.mkdir()
    (xe,) = source(root, proc_root).read()
    assert (xe.error, xe.power_limit_w) == (None, None)
    assert xe.field_errors == ("power_limit_w: Is a directory",)


# -- processes (DRM fdinfo) ----------------------------------------------------------------

def client(pid: int, comm: str, card: sysfs.Card, fdinfo: str) -> Process:
    return Process(pid, comm, (*procfs.STDIO, Fd(4, f"/dev/dri/renderD{card.render_minor}",
                                                 fdinfo)))


def test_xe_process_memory_is_its_resident_vram(tmp_path: Path) -> None:
    resident_mib = 6144
    text = procfs.xe_fdinfo(XE.pci_address, 20, total_vram0=f"{8192 * 1024} KiB",
                            resident_vram0=f"{resident_mib} MiB")
    proc = procfs.write_proc(tmp_path / "proc", client(777, "llama-server", XE, text))
    (xe,) = source(sysfs.write_tree(tmp_path / "sys", XE), str(proc)).read()
    assert xe.processes == (GpuProcess(pid=777, name="llama-server",
                                       memory_gb=gib(resident_mib * MIB)),)


def test_integrated_i915_process_memory_is_its_system_memory(tmp_path: Path) -> None:
    system_kib = 262144
    text = procfs.i915_fdinfo(I915.pci_address, 5, f"{system_kib} KiB")
    proc = procfs.write_proc(tmp_path / "proc", client(888, "firefox", I915, text))
    (i915,) = source(sysfs.write_tree(tmp_path / "sys", I915), str(proc)).read()
    (process,) = i915.processes or ()
    assert process.memory_gb == gib(system_kib * KIB)


def test_cards_without_clients_have_no_processes(xe_and_i915: str, proc_root: str) -> None:
    assert [d.processes for d in source(xe_and_i915, proc_root).read()] == [(), ()]
