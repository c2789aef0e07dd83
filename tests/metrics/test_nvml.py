"""NVML source: one init per process, handles reused, errors mapped, devices read exactly.

The fake binding (tests/fakes/fake_pynvml.py) stands in for pynvml + the driver; the code
under test is the real ``NvmlSource``.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from chiffon_worker.errors import GpuProbeError, GpuSourceUnavailable
from chiffon_worker.metrics.gpu import GpuProber
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


def source_for(scenario: fnv.Scenario, **kwargs: object) -> tuple[NvmlSource, object]:
    mod, load = fnv.loader(scenario)
    return NvmlSource(load=load, **kwargs), mod  # type: ignore[arg-type]


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
    assert mod.calls["nvmlDeviceGetMemoryInfo_v2"] == 1  # type: ignore[attr-defined]
    assert mod.calls["nvmlDeviceGetMemoryInfo"] == 4  # type: ignore[attr-defined]


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
    assert bad.error is not None and "GpuIsLost" in bad.error


def test_init_runs_once_and_handles_are_reused() -> None:
    src, mod = source_for(fnv.Scenario(gpus=[fnv.RTX4090_V2, fnv.RTX3090]))
    for _ in range(3):
        src.read()
    assert mod.calls["nvmlInit"] == 1  # type: ignore[attr-defined]
    assert mod.calls["nvmlDeviceGetHandleByIndex"] == 2  # type: ignore[attr-defined]


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
    assert mod.calls["nvmlInit"] == 1  # type: ignore[attr-defined]
    scenario.init_error = None  # the driver got loaded meanwhile
    clock.now += 1.5  # 60.5 s after the failure
    assert src.read()[0].name == "NVIDIA GeForce RTX 4090"
    assert mod.calls["nvmlInit"] == 2  # type: ignore[attr-defined]


def test_unavailability_is_remembered_too() -> None:
    clock = FakeClock()
    src, mod = source_for(fnv.Scenario(init_error="NVML_ERROR_LIBRARY_NOT_FOUND"), clock=clock)
    for _ in range(5):
        with pytest.raises(GpuSourceUnavailable):
            src.read()
    assert mod.calls["nvmlInit"] == 1  # type: ignore[attr-defined]


def test_close_shuts_nvml_down_once_initialised() -> None:
    src, mod = source_for(fnv.Scenario(gpus=[fnv.RTX4090_V2]))
    src.close()
    assert mod.calls["nvmlShutdown"] == 0  # type: ignore[attr-defined]
    src.read()
    src.close()
    assert mod.calls["nvmlShutdown"] == 1  # type: ignore[attr-defined]


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

FAKE_LIB_SOURCE = Path(__file__).resolve().parents[1] / "fakes" / "libnvidia-ml" / "fake_nvml.c"
REPO_ROOT = Path(__file__).resolve().parents[2]
PROBE_SCRIPT = """
import json
from chiffon_worker.errors import ChiffonError
from chiffon_worker.metrics.gpu import GpuMetrics
from chiffon_worker.metrics.gpu_types import flat_gpu_keys
from chiffon_worker.metrics.nvml import NvmlSource
try:
    devices = NvmlSource().read()
except ChiffonError as exc:
    print(json.dumps({"error": type(exc).__name__, "text": str(exc)}))
else:
    gpu = GpuMetrics(sysfs_root="/nonexistent", timeout_s=10)
    keys = flat_gpu_keys(gpu.sample())
    gpu.close()
    print(json.dumps({"devices": [d.to_dict() for d in devices], "keys": keys}))
"""


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
def fake_lib_v1_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _compile(tmp_path_factory.mktemp("libnvml-v1"), "-DFAKE_NVML_NO_MEMORY_V2")


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


def test_real_binding_reads_the_fake_library_exactly(fake_lib: Path) -> None:
    result = run_real_binding(fake_lib)
    assert _as_rows(result["devices"]) == _expected_fake_devices()


def test_real_binding_snapshot_keys_pick_the_a100_as_primary(fake_lib: Path) -> None:
    keys = run_real_binding(fake_lib)["keys"]
    assert (keys["gpu_type"], keys["gpu_count"]) == ("nvidia", 2)
    assert keys["gpu_vram_total_gb"] == gib(81920 << 20) == 80.0
    assert keys["gpu_vram_available_gb"] == gib(45383 << 20)
    assert (keys["gpu_probe"]["state"], keys["gpu_probe"]["source"]) == ("ok", "nvml")


def test_real_binding_falls_back_to_v1_memory_on_an_old_driver(fake_lib_v1_only: Path) -> None:
    result = run_real_binding(fake_lib_v1_only)
    assert _as_rows(result["devices"]) == _expected_fake_devices()


def test_real_binding_version_mismatch_is_a_clear_probe_error(fake_lib: Path) -> None:
    result = run_real_binding(fake_lib, FAKE_NVML_INIT_RC="18")
    assert result["error"] == "GpuProbeError"
    assert result["text"].startswith("NVML: driver/library version mismatch")


def test_real_binding_lost_gpu_marks_only_that_device(fake_lib: Path) -> None:
    devices = run_real_binding(fake_lib, FAKE_NVML_LOST="1")["devices"]
    assert devices[0]["error"] is None
    assert devices[1]["vram_total_gb"] is None
    assert "GpuIsLost" in devices[1]["error"]
