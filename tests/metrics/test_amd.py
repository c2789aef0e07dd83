"""AMD source: amdgpu sysfs (APU and discrete), connectors skipped, rocm-smi fallback."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from chiffon_worker.errors import GpuProbeError, GpuSourceUnavailable
from chiffon_worker.metrics.amd import AmdSysfsSource, parse_rocm_smi_vram
from chiffon_worker.metrics.drm import drm_cards
from chiffon_worker.metrics.gpu import GpuMetrics, GpuProber
from chiffon_worker.metrics.gpu_types import flat_gpu_keys
from chiffon_worker.metrics.nvml import NvmlSource
from tests.fakes import fake_pynvml as fnv
from tests.fakes import nvidia_smi as fake
from tests.fakes import sysfs

APU = sysfs.AMD_APU_CARD0
DGPU = sysfs.AMD_DGPU_CARD1


def gib(n_bytes: int | str) -> float:
    return round(int(n_bytes) / 2**30, 3)


def expected_vram(card: sysfs.Card) -> tuple[float, float]:
    total, used = int(card.attrs["mem_info_vram_total"]), int(card.attrs["mem_info_vram_used"])
    return gib(total), gib(total - used)


@pytest.fixture
def apu_and_dgpu(tmp_path: Path) -> str:
    return str(sysfs.write_tree(tmp_path, APU, DGPU))


@pytest.fixture(autouse=True)
def no_tools_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_discrete_card_reports_sysfs_values_exactly(apu_and_dgpu: str) -> None:
    dgpu = AmdSysfsSource(apu_and_dgpu).read(5)[1]
    total, available = expected_vram(DGPU)
    assert (dgpu.index, dgpu.vendor, dgpu.name) == (1, "amd", "AMD GPU 0x744c")
    assert (dgpu.vram_total_gb, dgpu.vram_available_gb) == (total, available)
    assert dgpu.utilization_percent == float(DGPU.attrs["gpu_busy_percent"])
    assert dgpu.temperature_c == DGPU.hwmon["temp1_input"] / 1000
    assert dgpu.error is None


def test_apu_reports_carve_out_as_vram_and_gtt_in_extra(apu_and_dgpu: str) -> None:
    apu = AmdSysfsSource(apu_and_dgpu).read(5)[0]
    total, available = expected_vram(APU)
    assert (apu.index, apu.vram_total_gb, apu.vram_available_gb) == (0, total, available)
    assert apu.extra == {"gtt_total_gb": gib(APU.attrs["mem_info_gtt_total"])}
    assert apu.to_dict()["gtt_total_gb"] == 16.0
    assert apu.temperature_c == 24.0
    assert apu.utilization_percent == 10.0


def test_connector_entries_are_not_counted_as_cards(apu_and_dgpu: str) -> None:
    drm = Path(apu_and_dgpu) / "class" / "drm"
    assert (drm / "card0-DP-1" / "device" / "vendor").exists()  # the trap is armed
    assert [d.index for d in AmdSysfsSource(apu_and_dgpu).read(5)] == [0, 1]


def test_snapshot_keys_name_the_discrete_card_as_primary(apu_and_dgpu: str) -> None:
    gpu = GpuMetrics(prober=GpuProber(apu_and_dgpu, nvml=NvmlSource(load=fnv.unavailable_loader)))
    try:
        keys = flat_gpu_keys(gpu.sample())
    finally:
        gpu.close()
    total, available = expected_vram(DGPU)
    assert keys["gpu_vram_total_gb"] == total == round(25753026560 / 2**30, 3)
    assert keys["gpu_vram_available_gb"] == available
    assert (keys["gpu_type"], keys["gpu_count"]) == ("amd", 2)
    assert keys["gpu_probe"]["state"] == "ok"
    assert keys["gpu_probe"]["source"] == "amd-sysfs"
    assert [g["index"] for g in keys["gpus"]] == [0, 1]


def test_card_numbers_of_ten_and_more_sort_numerically(tmp_path: Path) -> None:
    root = sysfs.write_tree(tmp_path, replace(DGPU, number=2),
                            sysfs.renumbered(DGPU, 10, "0000:0a:00.0"))
    devices = AmdSysfsSource(str(root)).read(5)
    assert [d.index for d in devices] == [2, 10]
    assert devices[1].vram_total_gb == expected_vram(DGPU)[0]


def test_drm_cards_selects_by_vendor(tmp_path: Path) -> None:
    root = sysfs.write_tree(tmp_path, DGPU, sysfs.INTEL_XE_CARD0)
    assert [p.name for p in drm_cards(str(root), "0x1002")] == ["card1"]
    assert [p.name for p in drm_cards(str(root), "0x8086")] == ["card0"]


def test_no_amd_card_is_unavailable(tmp_path: Path) -> None:
    root = sysfs.write_tree(tmp_path, sysfs.INTEL_XE_CARD0)
    with pytest.raises(GpuSourceUnavailable):
        AmdSysfsSource(str(root)).read(5)


def test_no_drm_directory_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(GpuSourceUnavailable):
        AmdSysfsSource(str(tmp_path)).read(5)


def test_unreadable_card_carries_its_own_error_and_others_are_reported(tmp_path: Path) -> None:
    root = sysfs.write_tree(tmp_path, APU, DGPU)
    broken = root / "bus" / "pci" / "devices" / DGPU.pci_address / "mem_info_vram_total"
    broken.unlink()
    broken.mkdir()  # reading it now fails with EISDIR, like an EIO from a wedged card
    apu, dgpu = AmdSysfsSource(str(root)).read(5)
    assert apu.error is None
    assert apu.vram_total_gb == expected_vram(APU)[0]
    assert dgpu.index == 1
    assert dgpu.vram_total_gb is None
    assert dgpu.error is not None and dgpu.error.startswith("card1:")


def test_garbage_attribute_is_that_cards_error(tmp_path: Path) -> None:
    root = sysfs.write_tree(tmp_path, replace(DGPU, attrs={**DGPU.attrs,
                                                           "gpu_busy_percent": "busy"}))
    (dgpu,) = AmdSysfsSource(str(root)).read(5)
    assert dgpu.error is not None and "busy" in dgpu.error


# -- rocm-smi where sysfs has no memory figures ---------------------------------------------

NO_MEMINFO = replace(DGPU, attrs={"gpu_busy_percent": 4})
ROCM_JSON = json.dumps({"card1": {"VRAM Total Memory (B)": "25753026560",
                                  "VRAM Total Used Memory (B)": "1073741824"}})


def test_missing_mem_info_is_read_from_rocm_smi(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = sysfs.write_tree(tmp_path, NO_MEMINFO)
    tool = fake.printing(tmp_path, ROCM_JSON, name="rocm-smi")
    tool.install(monkeypatch)
    (dgpu,) = AmdSysfsSource(str(root)).read(5)
    assert (dgpu.vram_total_gb, dgpu.vram_available_gb) == expected_vram(DGPU)
    assert dgpu.source == "rocm-smi"
    assert dgpu.utilization_percent == 4.0


def test_rocm_smi_is_not_run_when_sysfs_has_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = sysfs.write_tree(tmp_path, DGPU)
    tool = fake.printing(tmp_path, ROCM_JSON, name="rocm-smi")
    tool.install(monkeypatch)
    AmdSysfsSource(str(root)).read(5)
    assert tool.calls == 0


def test_missing_mem_info_without_rocm_smi_is_unknown_vram(tmp_path: Path) -> None:
    root = sysfs.write_tree(tmp_path, NO_MEMINFO)
    (dgpu,) = AmdSysfsSource(str(root)).read(5)
    assert (dgpu.vram_total_gb, dgpu.vram_available_gb, dgpu.error) == (None, None, None)


def test_failing_rocm_smi_marks_the_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = sysfs.write_tree(tmp_path, NO_MEMINFO)
    fake.printing(tmp_path, "", "ERROR: GPU[1] : Unable to read\n", 2,
                  name="rocm-smi").install(monkeypatch)
    (dgpu,) = AmdSysfsSource(str(root)).read(5)
    assert dgpu.error == "rocm-smi: exit 2: ERROR: GPU[1] : Unable to read"
    assert dgpu.vram_total_gb is None


def test_parse_rocm_smi_reads_string_values() -> None:
    assert parse_rocm_smi_vram(ROCM_JSON) == {1: (25753026560, 1073741824)}


@pytest.mark.parametrize("text", [
    "WARNING: AMD GPU device(s) is/are in a low-power state",
    "[]",
    json.dumps({"card0": {"VRAM Total Memory (B)": "lots"}}),
], ids=["not-json", "not-an-object", "bad-number"])
def test_parse_rocm_smi_rejects_garbage(text: str) -> None:
    with pytest.raises(GpuProbeError, match="rocm-smi"):
        parse_rocm_smi_vram(text)
