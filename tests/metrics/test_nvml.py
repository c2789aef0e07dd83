"""NVML source: one init per process, handles reused, errors mapped, devices read exactly.

The fake binding (tests/fakes/fake_pynvml.py) stands in for pynvml + the driver; the code
under test is the real ``NvmlSource``.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest

from chiffon_worker.errors import GpuProbeError, GpuSourceUnavailable
from chiffon_worker.metrics.gpu import GpuProber
from chiffon_worker.metrics.gpu_types import GpuDevice, GpuProcess, MigUnit
from chiffon_worker.metrics.nvml import NvmlSource, nvidia_pci_devices, suspended_nvidia_cards
from tests.fakes import fake_pynvml as fnv
from tests.fakes import sysfs


def gib(n_bytes: int) -> float:
    return round(n_bytes / 2**30, 3)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def source_for(scenario: fnv.Scenario, **kwargs: object) -> tuple[NvmlSource, Any]:
    mod, load = fnv.loader(scenario)
    return NvmlSource(load=load, **kwargs), mod  # type: ignore[arg-type]


def read_one(gpu: fnv.FakeGpu, **scenario: Any) -> GpuDevice:
    """The one device a fresh source reads from a machine with just ``gpu``."""
    src, _ = source_for(fnv.Scenario(gpus=[gpu], **scenario))
    (device,) = src.read()
    return device


def watts(milliwatts: int | None) -> float:
    assert milliwatts is not None
    return round(milliwatts / 1000, 1)


def own_name() -> str:
    return psutil.Process(os.getpid()).name()


#: A pid Linux can never hand out: its process is never visible.
INVISIBLE_PID = fnv.PID_MAX + 96
UNKNOWN_TEXT = fnv.ERROR_TEXT["NVML_ERROR_UNKNOWN"]


def test_v2_memory_reports_total_and_free_bytes_as_gib() -> None:
    src, _ = source_for(fnv.Scenario(gpus=[fnv.RTX4090_V2]))
    (device,) = src.read()
    assert device.vram_total_gb == gib(25757220864)
    assert device.vram_available_gb == gib(24946671616)


def test_device_fields_come_from_nvml() -> None:
    src, _ = source_for(fnv.Scenario(gpus=[fnv.RTX4090_V2]))
    (device,) = src.read()
    assert (device.index, device.vendor, device.name, device.utilization_percent,
            device.temperature_c, device.source, device.error) == (
        0, "nvidia", "NVIDIA GeForce RTX 4090", 2.0, 38.0, "nvml", None)


def test_v1_only_driver_falls_back_to_v1_memory_and_remembers_it() -> None:
    src, mod = source_for(fnv.Scenario(gpus=[fnv.RTX4090_V2, fnv.RTX3090], memory_v2=False))
    first = src.read()
    second = src.read()
    assert first == second
    assert [d.vram_total_gb for d in first] == [gib(25757220864), gib(24576 * 2**20)]
    assert [d.vram_available_gb for d in first] == [gib(24946671616), gib(24245 * 2**20)]
    assert mod.calls["nvmlDeviceGetMemoryInfo_v2"] == 1
    assert mod.calls["nvmlDeviceGetMemoryInfo"] == 4


def test_name_returned_as_bytes_is_decoded() -> None:
    gpu = replace(fnv.RTX4090_V2, name=b"NVIDIA GeForce RTX 4090")
    src, _ = source_for(fnv.Scenario(gpus=[gpu]))
    assert src.read()[0].name == "NVIDIA GeForce RTX 4090"


def test_mig_utilization_not_supported_is_unknown() -> None:
    src, _ = source_for(fnv.Scenario(gpus=[fnv.A100_MIG]))
    (device,) = src.read()
    assert device.utilization_percent is None
    assert device.temperature_c == 33.0
    assert device.vram_available_gb == gib(45383 * 2**20)


def test_memory_not_supported_is_unknown_vram() -> None:
    gpu = replace(fnv.RTX4090_V2, memory_supported=False)
    src, _ = source_for(fnv.Scenario(gpus=[gpu]))
    (device,) = src.read()
    assert (device.vram_total_gb, device.vram_available_gb, device.error) == (None, None, None)


def test_lost_gpu_marks_only_that_device() -> None:
    lost = replace(fnv.RTX3090, lost=True)
    src, _ = source_for(fnv.Scenario(gpus=[fnv.RTX4090_V2, lost]))
    good, bad = src.read()
    assert good.error is None
    assert good.vram_total_gb == gib(25757220864)
    assert bad.index == 1
    assert bad.vram_total_gb is None
    assert bad.vram_available_gb is None
    assert (bad.error, bad.health) == ("NVML: GPU is lost", "unhealthy")


def test_uuid_is_read_as_text() -> None:
    assert read_one(fnv.RTX4090_V2).uuid == fnv.RTX4090_V2.uuid


def test_compute_processes_are_listed_with_names_and_gib() -> None:
    me, invisible = os.getpid(), INVISIBLE_PID
    gpu = replace(fnv.RTX4090_V2, compute=[(me, 3 * 2**30), (invisible, 512 * 2**20)])
    assert read_one(gpu).processes == (
        GpuProcess(pid=me, name=own_name(), memory_gb=gib(3 * 2**30)),
        GpuProcess(pid=invisible, name=None, memory_gb=gib(512 * 2**20)),
    )


def test_graphics_processes_are_listed_too() -> None:
    gpu = replace(fnv.RTX4090_V2, graphics=[(INVISIBLE_PID, 2**30)])
    assert read_one(gpu).processes == (
        GpuProcess(pid=INVISIBLE_PID, name=None, memory_gb=gib(2**30)),)


def test_a_process_in_both_lists_is_counted_once_with_the_larger_memory() -> None:
    compute_bytes, graphics_bytes = 700 * 2**20, 900 * 2**20
    gpu = replace(fnv.RTX4090_V2, compute=[(INVISIBLE_PID, compute_bytes)],
                  graphics=[(INVISIBLE_PID, graphics_bytes)])
    (process,) = read_one(gpu).processes or ()
    assert process.memory_gb == gib(max(compute_bytes, graphics_bytes))


def test_unknown_process_memory_is_none_not_zero() -> None:
    gpu = replace(fnv.RTX4090_V2, compute=[(INVISIBLE_PID, None),
                                           (INVISIBLE_PID + 1, fnv.NOT_AVAILABLE)])
    assert [p.memory_gb for p in read_one(gpu).processes or ()] == [None, None]


def test_known_memory_wins_over_unknown_for_a_process_in_both_lists() -> None:
    gpu = replace(fnv.RTX4090_V2, compute=[(INVISIBLE_PID, None)],
                  graphics=[(INVISIBLE_PID, 2**30)])
    assert [p.memory_gb for p in read_one(gpu).processes or ()] == [gib(2**30)]


def test_a_gpu_without_processes_has_an_empty_process_tuple() -> None:
    assert read_one(fnv.RTX4090_V2).processes == ()


def test_process_owner_is_left_for_the_classifier() -> None:
    gpu = replace(fnv.RTX4090_V2, compute=[(os.getpid(), 2**30)])
    assert [p.owner for p in read_one(gpu).processes or ()] == ["unknown"]


def test_one_failing_process_list_leaves_processes_unknown_with_a_field_error() -> None:
    gpu = replace(fnv.RTX4090_V2, compute=[(INVISIBLE_PID, 2**30)],
                  errors={"nvmlDeviceGetGraphicsRunningProcesses": "NVML_ERROR_UNKNOWN"})
    device = read_one(gpu)
    assert (device.processes, device.field_errors) == (None, (f"processes: {UNKNOWN_TEXT}",))


def test_power_draw_and_enforced_limit_are_watts() -> None:
    device = read_one(fnv.RTX4090_V2)
    assert (device.power_draw_w, device.power_limit_w) == (
        watts(fnv.RTX4090_V2.power_mw), watts(fnv.RTX4090_V2.power_limit_mw))


def test_throttle_mask_is_reported_by_reason_name() -> None:
    assert read_one(fnv.RTX4090_V2).throttle_reasons == ("sw_power_cap",)  # mask 0x4
    slowed = replace(fnv.RTX4090_V2, throttle_mask=0x8 | 0x40)
    assert read_one(slowed).throttle_reasons == ("hw_slowdown", "hw_thermal_slowdown")


def test_no_active_throttle_reason_is_an_empty_tuple() -> None:
    assert read_one(replace(fnv.RTX4090_V2, throttle_mask=0)).throttle_reasons == ()


def test_clock_event_reasons_are_preferred_to_the_deprecated_throttle_call() -> None:
    src, mod = source_for(fnv.Scenario(gpus=[fnv.RTX4090_V2]))
    src.read()
    assert mod.calls["nvmlDeviceGetCurrentClocksEventReasons"] == 1
    assert mod.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 0


def test_a_binding_without_clock_event_reasons_uses_throttle_reasons() -> None:
    absent = frozenset({"nvmlDeviceGetCurrentClocksEventReasons"})
    assert read_one(fnv.RTX4090_V2, absent=absent).throttle_reasons == ("sw_power_cap",)


def test_uncorrected_volatile_ecc_errors_are_counted() -> None:
    assert read_one(replace(fnv.A100_MIG, ecc_uncorrected=3)).ecc_uncorrected_volatile == 3
    assert read_one(fnv.A100_MIG).ecc_uncorrected_volatile == 0


def test_ecc_not_supported_is_unknown_without_an_error() -> None:
    device = read_one(fnv.RTX4090_V2)  # a consumer card
    assert (device.ecc_uncorrected_volatile, device.field_errors) == (None, ())


def test_mig_units_are_listed_by_slot_with_their_memory() -> None:
    expected = tuple(MigUnit(index=slot, name=str(unit.name),
                             memory_total_gb=gib(unit.total), memory_available_gb=gib(unit.free),
                             uuid=unit.uuid)
                     for slot, unit in sorted(fnv.A100_MIG_UNITS.items()))
    assert read_one(fnv.A100_MIG).mig == expected


def test_empty_mig_slots_are_skipped() -> None:
    src, mod = source_for(fnv.Scenario(gpus=[fnv.A100_MIG]))
    (device,) = src.read()
    assert mod.calls["nvmlDeviceGetMigDeviceHandleByIndex"] == fnv.A100_MIG.max_mig
    assert [unit.index for unit in device.mig] == sorted(fnv.A100_MIG_UNITS)


def test_a_mig_unit_without_memory_info_has_unknown_memory() -> None:
    unit = replace(fnv.A100_MIG_UNITS[0], memory_supported=False)
    device = read_one(replace(fnv.A100_MIG, mig={0: unit}))
    assert [(u.index, u.memory_total_gb, u.memory_available_gb) for u in device.mig] == [
        (0, None, None)]
    assert device.field_errors == ()


def test_mig_not_supported_means_no_units_and_no_error() -> None:
    device = read_one(fnv.RTX4090_V2)
    assert (device.mig, device.field_errors) == ((), ())


def test_mig_disabled_lists_no_units() -> None:
    gpu = replace(fnv.A100_MIG, mig_mode=fnv.NVML_DEVICE_MIG_DISABLE)
    src, mod = source_for(fnv.Scenario(gpus=[gpu]))
    (device,) = src.read()
    assert device.mig == ()
    assert mod.calls["nvmlDeviceGetMigDeviceHandleByIndex"] == 0


def test_processes_on_a_mig_gpu_come_from_the_parent_device() -> None:
    gpu = replace(fnv.A100_MIG, compute=[(INVISIBLE_PID, None)])
    assert read_one(gpu).processes == (GpuProcess(pid=INVISIBLE_PID, name=None, memory_gb=None),)


def test_unified_memory_device_is_unified_with_unknown_vram_and_no_error() -> None:
    device = read_one(fnv.GB10)
    assert (device.unified, device.vram_total_gb, device.vram_available_gb) == (True, None, None)
    assert (device.error, device.field_errors) == (None, ())
    assert (device.name, device.power_draw_w) == ("NVIDIA GB10", watts(fnv.GB10.power_mw))


def test_a_gpu_with_memory_is_not_unified() -> None:
    assert read_one(fnv.RTX4090_V2).unified is False


def test_reset_required_marks_only_that_device_unhealthy() -> None:
    src, _ = source_for(fnv.Scenario(gpus=[fnv.RTX4090_V2,
                                           replace(fnv.RTX3090, reset_required=True)]))
    good, bad = src.read()
    assert (good.error, good.vram_total_gb) == (None, gib(fnv.RTX4090_V2.total))
    assert (bad.index, bad.error, bad.health) == (1, "NVML: GPU requires reset", "unhealthy")
    assert bad.vram_total_gb is None


def test_reset_required_after_the_name_keeps_name_and_uuid() -> None:
    gpu = replace(fnv.RTX3090, errors={"nvmlDeviceGetMemoryInfo_v2": "NVML_ERROR_RESET_REQUIRED"})
    device = read_one(gpu)
    assert (device.name, device.uuid, device.error) == (
        fnv.RTX3090.name, fnv.RTX3090.uuid, "NVML: GPU requires reset")


def test_a_gpu_lost_after_a_good_probe_keeps_its_name_and_uuid() -> None:
    scenario = fnv.Scenario(gpus=[fnv.RTX3090])
    src, _ = source_for(scenario)
    src.read()
    scenario.gpus[0] = replace(fnv.RTX3090, lost=True)
    (device,) = src.read()
    assert (device.name, device.uuid, device.error) == (
        fnv.RTX3090.name, fnv.RTX3090.uuid, "NVML: GPU is lost")


def test_a_failing_power_query_marks_only_power_draw() -> None:
    gpu = replace(fnv.RTX4090_V2, errors={"nvmlDeviceGetPowerUsage": "NVML_ERROR_UNKNOWN"})
    device = read_one(gpu)
    assert device.power_draw_w is None
    assert device.field_errors == (f"power_draw_w: {UNKNOWN_TEXT}",)
    assert device.error is None
    assert device.power_limit_w == watts(fnv.RTX4090_V2.power_limit_mw)
    assert device.vram_total_gb == gib(fnv.RTX4090_V2.total)


@pytest.mark.parametrize(("function", "field_name"), [
    ("nvmlDeviceGetUUID", "uuid"),
    ("nvmlDeviceGetMemoryInfo_v2", "vram_total_gb"),
    ("nvmlDeviceGetUtilizationRates", "utilization_percent"),
    ("nvmlDeviceGetTemperature", "temperature_c"),
    ("nvmlDeviceGetPowerUsage", "power_draw_w"),
    ("nvmlDeviceGetEnforcedPowerLimit", "power_limit_w"),
    ("nvmlDeviceGetCurrentClocksEventReasons", "throttle_reasons"),
    ("nvmlDeviceGetTotalEccErrors", "ecc_uncorrected_volatile"),
    ("nvmlDeviceGetComputeRunningProcesses", "processes"),
    ("nvmlDeviceGetMigMode", "mig"),
    ("nvmlDeviceGetMigDeviceHandleByIndex", "mig"),
])
def test_a_failing_query_is_a_field_error_named_after_its_field(
        function: str, field_name: str) -> None:
    gpu = replace(fnv.A100_MIG, utilization=7, errors={function: "NVML_ERROR_UNKNOWN"})
    device = read_one(gpu)
    assert device.field_errors == (f"{field_name}: {UNKNOWN_TEXT}",)
    assert device.error is None
    empty = () if field_name == "mig" else None
    assert getattr(device, field_name) == empty


def test_unsupported_readings_are_unknown_without_errors() -> None:
    gpu = replace(fnv.RTX4090_V2, uuid=None, power_mw=None, power_limit_mw=None,
                  utilization=None, temperature=None)
    device = read_one(gpu)
    assert (device.uuid, device.power_draw_w, device.power_limit_w,
            device.utilization_percent, device.temperature_c) == (None,) * 5
    assert (device.field_errors, device.error) == ((), None)


def test_nvml_shut_down_under_a_read_is_a_probe_error_and_reinitialises() -> None:
    scenario = fnv.Scenario(gpus=[replace(
        fnv.RTX4090_V2, errors={"nvmlDeviceGetPowerUsage": "NVML_ERROR_UNINITIALIZED"})])
    src, mod = source_for(scenario)
    with pytest.raises(GpuProbeError, match="re-initialise"):
        src.read()
    scenario.gpus[0] = fnv.RTX4090_V2
    assert src.read()[0].power_draw_w == watts(fnv.RTX4090_V2.power_mw)
    assert mod.calls["nvmlInit"] == 2


OLD_PROCESS_AND_THROTTLE = frozenset({"nvmlDeviceGetCurrentClocksEventReasons",
                                      "nvmlDeviceGetComputeRunningProcesses",
                                      "nvmlDeviceGetGraphicsRunningProcesses"})


def test_functions_an_old_binding_lacks_are_looked_up_once() -> None:
    gpu = replace(fnv.RTX4090_V2, compute=[(INVISIBLE_PID, 2**30)])
    src, mod = source_for(fnv.Scenario(gpus=[gpu], absent=OLD_PROCESS_AND_THROTTLE))
    reads = 3
    for _ in range(reads):
        (device,) = src.read()
    assert [mod.calls[f"lookup:{name}"] for name in sorted(OLD_PROCESS_AND_THROTTLE)] == [1] * 3
    assert mod.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == reads
    assert mod.calls["nvmlDeviceGetComputeRunningProcesses_v2"] == reads
    assert device.throttle_reasons == ("sw_power_cap",)
    assert [p.pid for p in device.processes or ()] == [INVISIBLE_PID]


def test_functions_an_old_driver_lacks_are_called_once() -> None:
    src, mod = source_for(fnv.Scenario(gpus=[fnv.RTX4090_V2],
                                       old_driver=OLD_PROCESS_AND_THROTTLE))
    reads = 3
    for _ in range(reads):
        (device,) = src.read()
    assert [mod.calls[name] for name in sorted(OLD_PROCESS_AND_THROTTLE)] == [1] * 3
    assert mod.calls["nvmlDeviceGetGraphicsRunningProcesses_v2"] == reads
    assert (device.throttle_reasons, device.processes, device.field_errors) == (
        ("sw_power_cap",), (), ())


def test_a_missing_function_is_logged_once_at_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chiffon_worker.metrics.nvml")
    src, _ = source_for(fnv.Scenario(gpus=[fnv.RTX4090_V2, fnv.RTX3090],
                                     absent=frozenset({"nvmlDeviceGetPowerUsage"})))
    for _ in range(3):
        src.read()
    notes = [r for r in caplog.records if "nvmlDeviceGetPowerUsage" in r.getMessage()]
    assert [r.levelno for r in notes] == [logging.INFO]


def test_a_function_missing_everywhere_leaves_its_field_unknown_without_error() -> None:
    device = read_one(fnv.RTX4090_V2, absent=frozenset({"nvmlDeviceGetPowerUsage"}))
    assert (device.power_draw_w, device.field_errors) == (None, ())


def test_init_runs_once_and_handles_are_reused() -> None:
    src, mod = source_for(fnv.Scenario(gpus=[fnv.RTX4090_V2, fnv.RTX3090]))
    for _ in range(3):
        src.read()
    assert mod.calls["nvmlInit"] == 1
    assert mod.calls["nvmlDeviceGetHandleByIndex"] == 2


def test_missing_library_is_unavailable() -> None:
    src, _ = source_for(fnv.Scenario(init_error="NVML_ERROR_LIBRARY_NOT_FOUND"))
    with pytest.raises(GpuSourceUnavailable, match="libnvidia-ml"):
        src.read()


def test_missing_binding_is_unavailable() -> None:
    with pytest.raises(GpuSourceUnavailable, match="binding"):
        NvmlSource(load=fnv.unavailable_loader).read()


@pytest.mark.parametrize(("error", "text"), [
    ("NVML_ERROR_DRIVER_NOT_LOADED", "NVML: NVIDIA driver is not loaded"),
    ("NVML_ERROR_LIB_RM_VERSION_MISMATCH", "NVML: driver/library version mismatch"),
    ("NVML_ERROR_NO_PERMISSION", "NVML: no permission"),
    ("NVML_ERROR_UNKNOWN", "NVML: unknown error"),
])
def test_init_failure_of_a_present_driver_is_a_clear_probe_error(error: str, text: str) -> None:
    src, _ = source_for(fnv.Scenario(gpus=[fnv.RTX4090_V2], init_error=error))
    with pytest.raises(GpuProbeError) as info:
        src.read()
    assert str(info.value).startswith(text)


def test_failed_init_is_retried_at_most_every_60_seconds() -> None:
    clock = FakeClock()
    scenario = fnv.Scenario(gpus=[fnv.RTX4090_V2], init_error="NVML_ERROR_DRIVER_NOT_LOADED")
    src, mod = source_for(scenario, clock=clock)
    for advance in (0.0, 30.0, 29.0):
        clock.now += advance
        with pytest.raises(GpuProbeError, match="driver is not loaded"):
            src.read()
    assert mod.calls["nvmlInit"] == 1
    scenario.init_error = None  # the driver got loaded meanwhile
    clock.now += 1.5  # 60.5 s after the failure
    assert src.read()[0].name == "NVIDIA GeForce RTX 4090"
    assert mod.calls["nvmlInit"] == 2


def test_unavailability_is_remembered_too() -> None:
    clock = FakeClock()
    src, mod = source_for(fnv.Scenario(init_error="NVML_ERROR_LIBRARY_NOT_FOUND"), clock=clock)
    for _ in range(5):
        with pytest.raises(GpuSourceUnavailable):
            src.read()
    assert mod.calls["nvmlInit"] == 1


def test_close_shuts_nvml_down_once_initialised() -> None:
    src, mod = source_for(fnv.Scenario(gpus=[fnv.RTX4090_V2]))
    src.close()
    assert mod.calls["nvmlShutdown"] == 0
    src.read()
    src.close()
    assert mod.calls["nvmlShutdown"] == 1


def test_importing_the_gpu_modules_imports_no_binding_and_probes_nothing() -> None:
    code = ("import sys, chiffon_worker.metrics.gpu as g; "
            "g.GpuMetrics(); g.GpuProber(); "
            "assert 'pynvml' not in sys.modules, 'pynvml imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- runtime-suspended dGPU (hybrid laptops): sysfs, not NVML ------------------------------


def test_all_suspended_nvidia_gpus_are_reported_from_sysfs_without_waking_them(
        tmp_path: Path) -> None:
    root = sysfs.write_tree(tmp_path, sysfs.nvidia_card("0000:01:00.0",
                                                       runtime_status="suspended"))
    _, load = fnv.loader(fnv.Scenario(gpus=[fnv.RTX4090_V2]))
    mod = load()
    prober = GpuProber(str(root), nvml=NvmlSource(load=load))
    (device,) = prober.probe().devices
    assert (device.vendor, device.name, device.vram_total_gb, device.source) == (
        "nvidia", "NVIDIA GPU 0x2684", None, "nvidia-sysfs")
    assert device.extra["power_state"] == "suspended"
    assert mod.calls["nvmlInit"] == 0


def test_an_awake_nvidia_gpu_is_read_through_nvml(tmp_path: Path) -> None:
    root = sysfs.write_tree(tmp_path,
                            sysfs.nvidia_card("0000:01:00.0", runtime_status="suspended"),
                            sysfs.nvidia_card("0000:02:00.0", runtime_status="active"))
    assert suspended_nvidia_cards(str(root)) is None


def test_nvidia_pci_devices_lists_only_nvidia_display_controllers(tmp_path: Path) -> None:
    root = sysfs.write_tree(tmp_path, sysfs.AMD_DGPU_CARD1,
                            sysfs.nvidia_card("0000:01:00.0"))
    audio = replace(sysfs.nvidia_card("0000:01:00.1"), pci_class="0x040300")
    sysfs.write_card(root, audio)
    assert [p.name for p in nvidia_pci_devices(str(root)) or ()] == ["0000:01:00.0"]


def test_nvidia_pci_devices_is_unknown_without_a_pci_bus_directory(tmp_path: Path) -> None:
    assert nvidia_pci_devices(str(tmp_path)) is None


def _has_libnvidia_ml() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(_has_libnvidia_ml(), reason="this machine has libnvidia-ml.so.1")
def test_real_binding_without_a_library_is_unavailable() -> None:
    with pytest.raises(GpuSourceUnavailable):
        NvmlSource().read()


# -- the real binding against a C stand-in for libnvidia-ml.so.1 -------------------------------
# Fixture values: the header comment of tests/fakes/libnvidia-ml/fake_nvml.c.

FAKE_LIB_SOURCE = Path(__file__).resolve().parents[1] / "fakes" / "libnvidia-ml" / "fake_nvml.c"
REPO_ROOT = Path(__file__).resolve().parents[2]
PROBE_SCRIPT = """
import json, os
import psutil
from chiffon_worker.errors import ChiffonError
from chiffon_worker.metrics.gpu import GpuMetrics
from chiffon_worker.metrics.gpu_snapshot import gpu_keys
from chiffon_worker.metrics.nvml import NvmlSource
me = {"pid": os.getpid(), "name": psutil.Process().name()}
try:
    devices = NvmlSource().read()
except ChiffonError as exc:
    print(json.dumps({"error": type(exc).__name__, "text": str(exc)}))
else:
    gpu = GpuMetrics(sysfs_root="/nonexistent", timeout_s=10)
    keys = gpu_keys(gpu.sample())
    gpu.close()
    print(json.dumps({"devices": [d.to_dict() for d in devices], "keys": keys, "me": me}))
"""
#: Fixture values of fake_nvml.c.
FAKE_UUIDS = ["GPU-4090aaaa-0000-0000-0000-000000000000",
              "GPU-a100a100-0000-0000-0000-000000000000"]
FAKE_POWER_MW = [123456, 61234]
FAKE_LIMIT_MW = [450000, 400000]
FAKE_THROTTLE = [("sw_power_cap",), ("gpu_idle",)]  # masks 0x4 and 0x1
FAKE_MIG = [(0, "MIG-a100a100-0000-0000-0000-000000000000", 40192 << 20, 20096 << 20),
            (3, "MIG-a100a100-0000-0000-0000-000000000003", 40192 << 20, 25287 << 20)]


def _compile(out_dir: Path, *defines: str) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc to build the fake libnvidia-ml.so.1")
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([gcc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", *defines,
                    "-o", str(out_dir / "libnvidia-ml.so.1"), str(FAKE_LIB_SOURCE)],
                   check=True, timeout=120)
    return out_dir


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _compile(tmp_path_factory.mktemp("libnvml"))


@pytest.fixture(scope="module")
def fake_lib_r470(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _compile(tmp_path_factory.mktemp("libnvml-r470"), "-DFAKE_NVML_R470")


def run_real_binding(lib_dir: Path, **env: str) -> dict[str, Any]:
    environ = {**os.environ, "LD_LIBRARY_PATH": str(lib_dir), "PYTHONPATH": str(REPO_ROOT),
               **env}
    done = subprocess.run([sys.executable, "-c", PROBE_SCRIPT], env=environ, check=True,
                          capture_output=True, text=True, timeout=60)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _expected_fake_devices() -> list[tuple[Any, ...]]:
    return [
        ("NVIDIA GeForce RTX 4090", gib(25757220864), gib(24946671616), 2.0, 38.0, None),
        ("NVIDIA A100-SXM4-80GB", gib(81920 << 20), gib(45383 << 20), None, 33.0, None),
    ]


def _as_rows(devices: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(d["name"], d["vram_total_gb"], d["vram_available_gb"], d["utilization_percent"],
             d["temperature_c"], d["error"]) for d in devices]


def _expected_processes(me: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """GPU 0: this process in both lists (1 GiB compute, 512 MiB graphics), pid 4194400
    (compute, memory unknown), pid 4194401 (graphics, 256 MiB); GPU 1: pid 4194402."""
    def proc(pid: int, name: str | None, used: int | None) -> dict[str, Any]:
        return GpuProcess(pid=pid, name=name,
                          memory_gb=None if used is None else gib(used)).to_dict()
    return [[proc(me["pid"], me["name"], max(1073741824, 536870912)),
             proc(4194400, None, None), proc(4194401, None, 268435456)],
            [proc(4194402, None, None)]]


def _expected_mig() -> list[dict[str, Any]]:
    return [MigUnit(index=slot, name="NVIDIA A100-SXM4-80GB MIG 3g.40gb",
                    memory_total_gb=gib(total), memory_available_gb=gib(free),
                    uuid=uuid).to_dict() for slot, uuid, total, free in FAKE_MIG]


def test_real_binding_reads_the_fake_library_exactly(fake_lib: Path) -> None:
    result = run_real_binding(fake_lib)
    assert _as_rows(result["devices"]) == _expected_fake_devices()


def test_real_binding_reads_uuid_power_throttle_and_ecc(fake_lib: Path) -> None:
    devices = run_real_binding(fake_lib)["devices"]
    assert [d["uuid"] for d in devices] == FAKE_UUIDS
    assert [d["power_draw_w"] for d in devices] == [round(mw / 1000, 1) for mw in FAKE_POWER_MW]
    assert [d["power_limit_w"] for d in devices] == [round(mw / 1000, 1) for mw in FAKE_LIMIT_MW]
    assert [tuple(d["throttle_reasons"]) for d in devices] == FAKE_THROTTLE
    assert [d["ecc_uncorrected_volatile"] for d in devices] == [None, 0]  # 4090: unsupported
    assert [d["field_errors"] for d in devices] == [[], []]


def test_real_binding_lists_compute_and_graphics_processes(fake_lib: Path) -> None:
    result = run_real_binding(fake_lib)
    assert [d["processes"] for d in result["devices"]] == _expected_processes(result["me"])


def test_real_binding_lists_mig_units_with_their_memory(fake_lib: Path) -> None:
    devices = run_real_binding(fake_lib)["devices"]
    assert [d["mig"] for d in devices] == [[], _expected_mig()]


def test_real_binding_snapshot_keys_pick_the_a100_as_primary(fake_lib: Path) -> None:
    keys = run_real_binding(fake_lib)["keys"]
    assert (keys["gpu_type"], keys["gpu_count"]) == ("nvidia", 2)
    assert keys["gpu_vram_total_gb"] == gib(81920 << 20) == 80.0
    assert keys["gpu_vram_available_gb"] == gib(45383 << 20)
    assert (keys["gpu_probe"]["state"], keys["gpu_probe"]["source"]) == ("ok", "nvml")


def test_real_binding_on_an_r470_driver_falls_back_to_older_functions(
        fake_lib_r470: Path) -> None:
    """No memory v2, no process _v3, no clock-event reasons: v1 memory, process _v2 and
    the deprecated throttle call give the same readings."""
    result = run_real_binding(fake_lib_r470)
    devices = result["devices"]
    assert _as_rows(devices) == _expected_fake_devices()
    assert [d["processes"] for d in devices] == _expected_processes(result["me"])
    assert [tuple(d["throttle_reasons"]) for d in devices] == FAKE_THROTTLE
    assert [d["field_errors"] for d in devices] == [[], []]


def test_real_binding_version_mismatch_is_a_clear_probe_error(fake_lib: Path) -> None:
    result = run_real_binding(fake_lib, FAKE_NVML_INIT_RC="18")
    assert result["error"] == "GpuProbeError"
    assert result["text"].startswith("NVML: driver/library version mismatch")


def test_real_binding_lost_gpu_marks_only_that_device(fake_lib: Path) -> None:
    devices = run_real_binding(fake_lib, FAKE_NVML_LOST="1")["devices"]
    assert devices[0]["error"] is None
    assert devices[1]["vram_total_gb"] is None
    assert (devices[1]["error"], devices[1]["health"]) == ("NVML: GPU is lost", "unhealthy")


def test_real_binding_reset_required_marks_only_that_device(fake_lib: Path) -> None:
    devices = run_real_binding(fake_lib, FAKE_NVML_RESET="0")["devices"]
    assert (devices[0]["error"], devices[0]["health"]) == ("NVML: GPU requires reset",
                                                           "unhealthy")
    assert (devices[1]["error"], devices[1]["uuid"]) == (None, FAKE_UUIDS[1])


def test_real_binding_unified_gb10_is_unified_with_unknown_vram(fake_lib: Path) -> None:
    gb10 = run_real_binding(fake_lib, FAKE_NVML_UNIFIED="1")["devices"][0]
    assert (gb10["name"], gb10["unified"], gb10["vram_total_gb"], gb10["vram_available_gb"]) \
        == ("NVIDIA GB10", True, None, None)
    assert (gb10["error"], gb10["field_errors"]) == (None, [])


def test_real_binding_failing_power_query_marks_only_power_draw(fake_lib: Path) -> None:
    devices = run_real_binding(fake_lib, FAKE_NVML_POWER_RC="999")["devices"]
    assert (devices[0]["power_draw_w"], devices[0]["field_errors"]) == (
        None, ["power_draw_w: Unknown Error"])
    assert devices[0]["power_limit_w"] == round(FAKE_LIMIT_MW[0] / 1000, 1)
    assert devices[1]["field_errors"] == []
