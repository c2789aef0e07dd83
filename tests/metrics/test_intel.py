"""Intel source: xe and i915 cards are present, VRAM unknown unless the driver tells."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from chiffon_worker.errors import GpuSourceUnavailable
from chiffon_worker.metrics.gpu import GpuMetrics, GpuProber
from chiffon_worker.metrics.gpu_types import flat_gpu_keys
from chiffon_worker.metrics.intel import IntelSysfsSource
from chiffon_worker.metrics.nvml import NvmlSource
from tests.fakes import fake_pynvml as fnv
from tests.fakes import sysfs

XE = sysfs.INTEL_XE_CARD0
I915 = sysfs.INTEL_I915_CARD1


def gib(n_bytes: int) -> float:
    return round(n_bytes / 2**30, 3)


@pytest.fixture
def xe_and_i915(tmp_path: Path) -> str:
    return str(sysfs.write_tree(tmp_path, XE, I915))


def test_xe_card_is_named_from_its_device_id_with_unknown_vram(xe_and_i915: str) -> None:
    xe = IntelSysfsSource(xe_and_i915).read()[0]
    assert (xe.index, xe.vendor, xe.name, xe.source) == (0, "intel", "Intel GPU 0xe20b",
                                                         "intel-sysfs")
    assert (xe.vram_total_gb, xe.vram_available_gb) == (None, None)


def test_xe_temperature_comes_from_temp2_input(xe_and_i915: str) -> None:
    assert IntelSysfsSource(xe_and_i915).read()[0].temperature_c == XE.hwmon["temp2_input"] / 1000


def test_i915_integrated_card_is_present_without_temperature(xe_and_i915: str) -> None:
    i915 = IntelSysfsSource(xe_and_i915).read()[1]
    assert (i915.index, i915.name, i915.temperature_c, i915.error) == (
        1, "Intel GPU 0x46a6", None, None)


def test_connector_entries_are_skipped(xe_and_i915: str) -> None:
    assert len(IntelSysfsSource(xe_and_i915).read()) == 2


def test_temp1_input_is_used_when_there_is_no_temp2(tmp_path: Path) -> None:
    root = sysfs.write_tree(tmp_path, replace(XE, hwmon={"temp1_input": 52500}))
    assert IntelSysfsSource(str(root)).read()[0].temperature_c == 52.5


def test_xe_tile_vram_sizes_are_summed_when_exposed(tmp_path: Path) -> None:
    # Hypothetical two-tile card: xe exposes tile<N>/physical_vram_size_bytes per tile.
    tile = 12 * 2**30
    card = replace(XE, files={"tile0/physical_vram_size_bytes": tile,
                              "tile1/physical_vram_size_bytes": tile})
    (xe,) = IntelSysfsSource(str(sysfs.write_tree(tmp_path, card))).read()
    assert (xe.vram_total_gb, xe.vram_available_gb) == (gib(2 * tile), None)


def test_mem_info_vram_total_is_used_when_exposed(tmp_path: Path) -> None:
    card = replace(XE, attrs={"mem_info_vram_total": 17179869184})
    (xe,) = IntelSysfsSource(str(sysfs.write_tree(tmp_path, card))).read()
    assert xe.vram_total_gb == 16.0


def test_no_intel_card_is_unavailable(tmp_path: Path) -> None:
    root = sysfs.write_tree(tmp_path, sysfs.AMD_DGPU_CARD1)
    with pytest.raises(GpuSourceUnavailable):
        IntelSysfsSource(str(root)).read()


def test_unreadable_card_carries_its_own_error(tmp_path: Path) -> None:
    root = sysfs.write_tree(tmp_path, XE, I915)
    broken = root / "bus" / "pci" / "devices" / XE.pci_address / "device"
    broken.unlink()
    broken.mkdir()
    xe, i915 = IntelSysfsSource(str(root)).read()
    assert xe.error is not None and xe.error.startswith("card0:")
    assert i915.error is None


def test_snapshot_of_intel_only_machine_has_type_intel_and_zero_vram(
        xe_and_i915: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi, no rocm-smi
    gpu = GpuMetrics(prober=GpuProber(xe_and_i915,
                                      nvml=NvmlSource(load=fnv.unavailable_loader)))
    try:
        keys = flat_gpu_keys(gpu.sample())
    finally:
        gpu.close()
    assert (keys["gpu_type"], keys["gpu_count"]) == ("intel", 2)
    assert (keys["gpu_vram_total_gb"], keys["gpu_vram_available_gb"]) == (0.0, 0.0)
    assert keys["gpus"][0]["name"] == "Intel GPU 0xe20b"
    assert keys["gpu_probe"]["state"] == "ok"
