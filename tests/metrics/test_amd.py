"""AMD source: amdgpu sysfs (APU and discrete), connectors skipped, rocm-smi fallback,
APU detection, power, RAS and processes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from chiffon_worker.errors import GpuProbeError, GpuSourceUnavailable
from chiffon_worker.metrics.amd import (
    AmdSysfsSource,
    KfdNode,
    parse_kfd_properties,
    parse_rocm_smi_vram,
)
from chiffon_worker.metrics.drm import drm_cards, pci_location_id
from chiffon_worker.metrics.drm_clients import DrmClientScanner
from chiffon_worker.metrics.gpu import GpuMetrics, GpuProber
from chiffon_worker.metrics.gpu_snapshot import gpu_keys
from chiffon_worker.metrics.gpu_types import GpuDevice, GpuProcess
from chiffon_worker.metrics.nvml import NvmlSource
from tests.fakes import fake_pynvml as fnv
from tests.fakes import nvidia_smi as fake
from tests.fakes import procfs, sysfs
from tests.fakes.procfs import Fd, Process

APU = sysfs.AMD_APU_CARD0
DGPU = sysfs.AMD_DGPU_CARD1
SMALL = sysfs.AMD_SMALL_DGPU_CARD2
MI210 = sysfs.AMD_MI210_CARD3


def gib(n_bytes: int | str) -> float:
    return round(int(n_bytes) / 2**30, 3)


def watts(microwatts: int) -> float:
    return round(microwatts / 1e6, 1)


def expected_vram(card: sysfs.Card) -> tuple[float, float]:
    total, used = int(card.attrs["mem_info_vram_total"]), int(card.attrs["mem_info_vram_used"])
    return gib(total), gib(total - used)


@pytest.fixture
def proc_root(tmp_path: Path) -> str:
    """An empty procfs: no process has a GPU open."""
    return str(procfs.write_proc(tmp_path / "proc"))


def source(root: str | Path, proc_root: str) -> AmdSysfsSource:
    return AmdSysfsSource(str(root), proc_root=proc_root)


def read_one(tmp_path: Path, card: sysfs.Card, proc_root: str) -> GpuDevice:
    (device,) = source(sysfs.write_tree(tmp_path / "sys", card), proc_root).read(5)
    return device


@pytest.fixture
def apu_and_dgpu(tmp_path: Path) -> str:
    return str(sysfs.write_tree(tmp_path, APU, DGPU))


@pytest.fixture(autouse=True)
def no_tools_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_discrete_card_reports_sysfs_values_exactly(apu_and_dgpu: str,
                                                    proc_root: str) -> None:
    dgpu = source(apu_and_dgpu, proc_root).read(5)[1]
    total, available = expected_vram(DGPU)
    assert (dgpu.index, dgpu.vendor, dgpu.name) == (1, "amd", "AMD GPU 0x744c")
    assert (dgpu.vram_total_gb, dgpu.vram_available_gb) == (total, available)
    assert dgpu.utilization_percent == float(DGPU.attrs["gpu_busy_percent"])
    assert dgpu.temperature_c == DGPU.hwmon["temp1_input"] / 1000
    assert dgpu.error is None


def test_apu_reports_carve_out_as_vram_and_gtt_in_extra(apu_and_dgpu: str,
                                                        proc_root: str) -> None:
    apu = source(apu_and_dgpu, proc_root).read(5)[0]
    total, available = expected_vram(APU)
    assert (apu.index, apu.vram_total_gb, apu.vram_available_gb) == (0, total, available)
    assert apu.extra == {"gtt_total_gb": gib(APU.attrs["mem_info_gtt_total"])}
    assert apu.to_dict()["gtt_total_gb"] == 16.0
    assert apu.temperature_c == 24.0
    assert apu.utilization_percent == 10.0


def test_connector_entries_are_not_counted_as_cards(apu_and_dgpu: str, proc_root: str) -> None:
    drm = Path(apu_and_dgpu) / "class" / "drm"
    assert (drm / "card0-DP-1" / "device" / "vendor").exists()  # the trap is armed
    assert [d.index for d in source(apu_and_dgpu, proc_root).read(5)] == [0, 1]


def test_snapshot_keys_name_the_discrete_card_as_primary(apu_and_dgpu: str,
                                                         proc_root: str) -> None:
    gpu = GpuMetrics(prober=GpuProber(apu_and_dgpu, nvml=NvmlSource(load=fnv.unavailable_loader),
                                      amd=source(apu_and_dgpu, proc_root)))
    try:
        keys = gpu_keys(gpu.sample())
    finally:
        gpu.close()
    total, available = expected_vram(DGPU)
    assert keys["gpu_vram_total_gb"] == total == round(25753026560 / 2**30, 3)
    assert keys["gpu_vram_available_gb"] == available
    assert (keys["gpu_type"], keys["gpu_count"]) == ("amd", 2)
    assert keys["gpu_probe"]["state"] == "ok"
    assert keys["gpu_probe"]["source"] == "amd-sysfs"
    assert [g["index"] for g in keys["gpus"]] == [0, 1]


def test_card_numbers_of_ten_and_more_sort_numerically(tmp_path: Path, proc_root: str) -> None:
    root = sysfs.write_tree(tmp_path, replace(DGPU, number=2),
                            sysfs.renumbered(DGPU, 10, "0000:0a:00.0"))
    devices = source(str(root), proc_root).read(5)
    assert [d.index for d in devices] == [2, 10]
    assert devices[1].vram_total_gb == expected_vram(DGPU)[0]


def test_drm_cards_selects_by_vendor(tmp_path: Path) -> None:
    root = sysfs.write_tree(tmp_path, DGPU, sysfs.INTEL_XE_CARD0)
    assert [p.name for p in drm_cards(str(root), "0x1002")] == ["card1"]
    assert [p.name for p in drm_cards(str(root), "0x8086")] == ["card0"]


def test_no_amd_card_is_unavailable(tmp_path: Path, proc_root: str) -> None:
    root = sysfs.write_tree(tmp_path, sysfs.INTEL_XE_CARD0)
    with pytest.raises(GpuSourceUnavailable):
        source(str(root), proc_root).read(5)


def test_no_drm_directory_is_unavailable(tmp_path: Path, proc_root: str) -> None:
    with pytest.raises(GpuSourceUnavailable):
        source(str(tmp_path), proc_root).read(5)


def test_unreadable_card_carries_its_own_error_and_others_are_reported(
        tmp_path: Path, proc_root: str) -> None:
    root = sysfs.write_tree(tmp_path, APU, DGPU)
    broken = root / "bus" / "pci" / "devices" / DGPU.pci_address / "mem_info_vram_total"
    broken.unlink()
    broken.mkdir()  # reading it now fails with EISDIR, like an EIO from a wedged card
    apu, dgpu = source(str(root), proc_root).read(5)
    assert apu.error is None
    assert apu.vram_total_gb == expected_vram(APU)[0]
    assert dgpu.index == 1
    assert dgpu.vram_total_gb is None
    assert dgpu.error is not None and dgpu.error.startswith("card1:")


def test_garbage_attribute_is_that_cards_error(tmp_path: Path, proc_root: str) -> None:
    root = sysfs.write_tree(tmp_path, replace(DGPU, attrs={**DGPU.attrs,
                                                           "gpu_busy_percent": "busy"}))
    (dgpu,) = source(str(root), proc_root).read(5)
    assert dgpu.error is not None and "busy" in dgpu.error


# -- rocm-smi where sysfs has no memory figures ---------------------------------------------

NO_MEMINFO = replace(DGPU, attrs={"gpu_busy_percent": 4})
ROCM_JSON = json.dumps({"card1": {"VRAM Total Memory (B)": "25753026560",
                                  "VRAM Total Used Memory (B)": "1073741824"}})


def test_missing_mem_info_is_read_from_rocm_smi(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proc_root: str) -> None:
    root = sysfs.write_tree(tmp_path, NO_MEMINFO)
    tool = fake.printing(tmp_path, ROCM_JSON, name="rocm-smi")
    tool.install(monkeypatch)
    (dgpu,) = source(str(root), proc_root).read(5)
    assert (dgpu.vram_total_gb, dgpu.vram_available_gb) == expected_vram(DGPU)
    assert dgpu.source == "rocm-smi"
    assert dgpu.utilization_percent == 4.0


def test_rocm_smi_is_not_run_when_sysfs_has_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proc_root: str) -> None:
    root = sysfs.write_tree(tmp_path, DGPU)
    tool = fake.printing(tmp_path, ROCM_JSON, name="rocm-smi")
    tool.install(monkeypatch)
    source(str(root), proc_root).read(5)
    assert tool.calls == 0


def test_missing_mem_info_without_rocm_smi_is_unknown_vram(tmp_path: Path,
                                                           proc_root: str) -> None:
    root = sysfs.write_tree(tmp_path, NO_MEMINFO)
    (dgpu,) = source(str(root), proc_root).read(5)
    assert (dgpu.vram_total_gb, dgpu.vram_available_gb, dgpu.error) == (None, None, None)


def test_failing_rocm_smi_marks_the_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         proc_root: str) -> None:
    root = sysfs.write_tree(tmp_path, NO_MEMINFO)
    fake.printing(tmp_path, "", "ERROR: GPU[1] : Unable to read\n", 2,
                  name="rocm-smi").install(monkeypatch)
    (dgpu,) = source(str(root), proc_root).read(5)
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


# -- APU detection: KFD topology, then vddnb; never VRAM size ------------------------------

def without_vddnb(card: sysfs.Card) -> sysfs.Card:
    return replace(card, hwmon={k: v for k, v in card.hwmon.items() if k != "in1_input"})


def test_apu_is_flagged_unified_by_its_kfd_node(tmp_path: Path, proc_root: str) -> None:
    apu = read_one(tmp_path, without_vddnb(APU), proc_root)  # only KFD can tell
    assert APU.kfd["cpu_cores_count"] > 0 and APU.kfd["simd_count"] > 0
    assert apu.unified is True


def test_apu_keeps_carve_out_as_vram_when_unified(tmp_path: Path, proc_root: str) -> None:
    apu = read_one(tmp_path, APU, proc_root)
    assert apu.unified is True
    assert (apu.vram_total_gb, apu.vram_available_gb) == expected_vram(APU)
    assert apu.extra["gtt_total_gb"] == gib(APU.attrs["mem_info_gtt_total"])


def test_small_discrete_card_with_large_gtt_is_not_unified(tmp_path: Path,
                                                           proc_root: str) -> None:
    small = read_one(tmp_path, SMALL, proc_root)
    assert int(SMALL.attrs["mem_info_gtt_total"]) > int(SMALL.attrs["mem_info_vram_total"])
    assert small.unified is False
    assert (small.extra["gtt_total_gb"], small.extra["gtt_used_gb"]) == (
        gib(SMALL.attrs["mem_info_gtt_total"]), gib(SMALL.attrs["mem_info_gtt_used"]))


def test_discrete_card_next_to_an_apu_is_not_unified(apu_and_dgpu: str, proc_root: str) -> None:
    apu, dgpu = source(apu_and_dgpu, proc_root).read(5)
    assert (apu.unified, dgpu.unified) == (True, False)


def test_apu_with_its_own_cpu_less_kfd_node_is_flagged_by_vddnb(tmp_path: Path,
                                                                proc_root: str) -> None:
    # Kernels that ignore CRAT (6.6 on): a CPU node, and a GPU node without CPU cores.
    split = replace(APU, kfd={**APU.kfd, "cpu_cores_count": 0})
    root = sysfs.write_tree(tmp_path / "sys", split)
    nodes = sorted((root / "class/kfd/kfd/topology/nodes").iterdir())
    assert len(nodes) == 2  # the trap: the CPU node holds the cores
    (apu,) = source(root, proc_root).read(5)
    assert apu.unified is True


def test_apu_without_kfd_topology_is_flagged_by_vddnb(tmp_path: Path, proc_root: str) -> None:
    apu = read_one(tmp_path, replace(APU, kfd={}), proc_root)
    assert apu.unified is True


def test_card_without_kfd_or_vddnb_is_discrete(tmp_path: Path, proc_root: str) -> None:
    card = read_one(tmp_path, without_vddnb(replace(APU, kfd={})), proc_root)
    assert card.unified is False


def test_kfd_node_is_matched_by_render_minor_without_location(tmp_path: Path,
                                                             proc_root: str) -> None:
    kfd = {k: v for k, v in APU.kfd.items() if k != "location_id"}
    apu = read_one(tmp_path, without_vddnb(replace(APU, kfd=kfd)), proc_root)
    assert apu.unified is True


def test_kfd_node_at_another_pci_location_is_not_this_card_even_with_its_minor(
        tmp_path: Path, proc_root: str) -> None:
    # A partitioned GPU's nodes carry its partitions' render minors: location decides.
    elsewhere = {**APU.kfd, "location_id": APU.kfd["location_id"] + 0x100}
    assert elsewhere["drm_render_minor"] == APU.render_minor
    card = read_one(tmp_path, without_vddnb(replace(APU, kfd=elsewhere)), proc_root)
    assert card.unified is False


@pytest.mark.parametrize("partition_bits", [2, 2 << 28], ids=["function-bits", "bits-31-28"])
def test_partition_id_in_location_id_still_matches_the_card(
        tmp_path: Path, proc_root: str, partition_bits: int) -> None:
    # Partitioned GPUs: kernels OR the partition's node id into location_id.
    partition = {**APU.kfd, "location_id": APU.kfd["location_id"] | partition_bits,
                 "drm_render_minor": 200}
    card = read_one(tmp_path, without_vddnb(replace(APU, kfd=partition)), proc_root)
    assert card.unified is True


@pytest.mark.parametrize(("address", "expected"), [
    ("0000:c4:00.0", (0, 0xC4 << 8)),
    ("0000:03:00.0", (0, 0x03 << 8)),
    ("0001:0a:1f.7", (1, (0x0A << 8) | (0x1F << 3) | 7)),
], ids=["apu", "dgpu", "domain-device-function"])
def test_location_id_packs_bus_device_function_like_pci_dev_id(
        address: str, expected: tuple[int, int]) -> None:
    assert pci_location_id(address) == expected


def test_fixture_location_ids_are_the_cards_pci_addresses() -> None:
    for card in (APU, DGPU, SMALL, MI210):
        assert pci_location_id(card.pci_address) == (card.kfd["domain"],
                                                     card.kfd["location_id"])


def test_kfd_properties_parse_the_kernels_name_value_lines() -> None:
    text = "".join(f"{k} {v}\n" for k, v in APU.kfd.items())
    assert parse_kfd_properties(text) == KfdNode(
        cpu_cores_count=APU.kfd["cpu_cores_count"], simd_count=APU.kfd["simd_count"],
        domain=APU.kfd["domain"], location_id=APU.kfd["location_id"],
        drm_render_minor=APU.kfd["drm_render_minor"])


# -- power -------------------------------------------------------------------------------

def test_power_draw_and_cap_are_watts(tmp_path: Path, proc_root: str) -> None:
    dgpu = read_one(tmp_path, DGPU, proc_root)
    assert dgpu.power_draw_w == watts(DGPU.hwmon["power1_average"]) == 38.5
    assert dgpu.power_limit_w == watts(DGPU.hwmon["power1_cap"])
    assert dgpu.field_errors == ()


def test_power_input_is_the_draw_without_power_average(tmp_path: Path, proc_root: str) -> None:
    apu = read_one(tmp_path, APU, proc_root)
    assert "power1_average" not in APU.hwmon
    assert (apu.power_draw_w, apu.power_limit_w) == (watts(APU.hwmon["power1_input"]), None)


def test_unreadable_power_is_a_field_error_not_a_card_error(tmp_path: Path,
                                                            proc_root: str) -> None:
    root = sysfs.write_tree(tmp_path / "sys", DGPU)
    broken = root / "bus/pci/devices" / DGPU.pci_address / "hwmon/hwmon0/power1_average"
    broken.unlink()
    broken.mkdir()  # reading it fails with EISDIR, like EIO from a busy SMU
    (dgpu,) = source(root, proc_root).read(5)
    assert (dgpu.error, dgpu.power_draw_w) == (None, None)
    assert dgpu.power_limit_w == watts(DGPU.hwmon["power1_cap"])
    assert dgpu.field_errors == ("power_draw_w: Is a directory",)


# -- ECC (RAS) -----------------------------------------------------------------------------

def test_ras_uncorrected_count_is_the_ecc_value(tmp_path: Path, proc_root: str) -> None:
    mi210 = read_one(tmp_path, MI210, proc_root)
    ue_line = str(MI210.files["ras/umc_err_count"]).splitlines()[0]
    assert mi210.ecc_uncorrected_volatile == int(ue_line.split(":")[1]) == 2
    assert mi210.field_errors == ()


def test_missing_ras_file_is_unknown_ecc_without_error(tmp_path: Path, proc_root: str) -> None:
    dgpu = read_one(tmp_path, DGPU, proc_root)
    assert (dgpu.ecc_uncorrected_volatile, dgpu.field_errors) == (None, ())


def test_unreadable_ras_file_is_a_field_error(tmp_path: Path, proc_root: str) -> None:
    root = sysfs.write_tree(tmp_path / "sys", MI210)
    broken = root / "bus/pci/devices" / MI210.pci_address / "ras/umc_err_count"
    broken.unlink()
    broken.mkdir()
    (mi210,) = source(root, proc_root).read(5)
    assert (mi210.error, mi210.ecc_uncorrected_volatile) == (None, None)
    assert mi210.field_errors == ("ecc_uncorrected_volatile: Is a directory",)


def test_ras_query_during_recovery_is_a_field_error(tmp_path: Path, proc_root: str) -> None:
    busy = replace(MI210, files={"ras/umc_err_count": "Query currently inaccessible"})
    mi210 = read_one(tmp_path, busy, proc_root)
    assert mi210.ecc_uncorrected_volatile is None
    assert mi210.field_errors == (
        "ecc_uncorrected_volatile: no ue count in 'Query currently inaccessible'",)


# -- processes (DRM fdinfo) ----------------------------------------------------------------

def amd_client(pid: int, comm: str, card: sysfs.Card, client_id: int, vram_kib: int,
               gtt_kib: int = 0) -> Process:
    text = procfs.amdgpu_fdinfo(card.pci_address, client_id, f"{vram_kib} KiB",
                                f"{gtt_kib} KiB")
    render = Fd(5, f"/dev/dri/renderD{card.render_minor}", text)
    return Process(pid, comm, (*procfs.STDIO, render))


def test_processes_of_each_card_come_from_fdinfo(tmp_path: Path) -> None:
    vram_kib = 4 * 1048576
    proc = procfs.write_proc(tmp_path / "proc", amd_client(4242, "ollama", DGPU, 7, vram_kib))
    root = sysfs.write_tree(tmp_path / "sys", APU, DGPU)
    apu, dgpu = source(root, str(proc)).read(5)
    assert dgpu.processes == (GpuProcess(pid=4242, name="ollama",
                                         memory_gb=gib(vram_kib * 1024)),)
    assert apu.processes == ()


def test_apu_process_memory_counts_vram_and_gtt(tmp_path: Path) -> None:
    vram_kib, gtt_kib = 262144, 3 * 1048576
    proc = procfs.write_proc(tmp_path / "proc",
                             amd_client(5150, "llama-server", APU, 3, vram_kib, gtt_kib))
    (apu,) = source(sysfs.write_tree(tmp_path / "sys", APU), str(proc)).read(5)
    (process,) = apu.processes or ()
    assert process.memory_gb == gib((vram_kib + gtt_kib) * 1024)


def test_discrete_process_memory_counts_vram_only(tmp_path: Path) -> None:
    vram_kib, gtt_kib = 262144, 3 * 1048576
    proc = procfs.write_proc(tmp_path / "proc",
                             amd_client(5151, "blender", DGPU, 3, vram_kib, gtt_kib))
    (dgpu,) = source(sysfs.write_tree(tmp_path / "sys", DGPU), str(proc)).read(5)
    (process,) = dgpu.processes or ()
    assert process.memory_gb == gib(vram_kib * 1024)


def test_incomplete_scan_leaves_processes_unknown_with_a_field_error(tmp_path: Path) -> None:
    proc = procfs.write_proc(tmp_path / "proc", amd_client(4242, "ollama", DGPU, 7, 1024))
    root = sysfs.write_tree(tmp_path / "sys", DGPU)
    no_time = DrmClientScanner(str(proc), scan_budget_s=0.0)
    (dgpu,) = AmdSysfsSource(str(root), clients=no_time).read(5)
    assert (dgpu.error, dgpu.processes) == (None, None)
    assert dgpu.field_errors == ("processes: scan incomplete",)
