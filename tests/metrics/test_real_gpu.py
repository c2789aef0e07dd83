"""The real NVML binding and the real nvidia-smi, on a machine that has an NVIDIA GPU.

Every test here is marked ``gpu`` and skips cleanly where the library, the tool or the
GPU is missing (``pytest -m gpu`` selects them on a GPU rig). Readings that change from
one moment to the next (power, throttle reasons, processes) are compared with tolerance,
or read from NVML before and after nvidia-smi so that a change in between is allowed.
"""

from __future__ import annotations

import re
import time

import pytest

from chiffon_worker.errors import GpuProbeError, GpuSourceUnavailable
from chiffon_worker.metrics.bounded_subprocess import run_bounded, which
from chiffon_worker.metrics.gpu import GpuMetrics
from chiffon_worker.metrics.gpu_health import throttle_names
from chiffon_worker.metrics.gpu_snapshot import gpu_keys
from chiffon_worker.metrics.gpu_types import GpuDevice
from chiffon_worker.metrics.nvidia_smi import NvidiaSmiSource
from chiffon_worker.metrics.nvml import NvmlSource

pytestmark = pytest.mark.gpu


def nvml_devices() -> tuple[NvmlSource, tuple[GpuDevice, ...]]:
    source = NvmlSource()
    try:
        devices = source.read()
    except GpuSourceUnavailable as exc:
        pytest.skip(f"no NVML here: {exc}")
    except GpuProbeError as exc:
        pytest.skip(f"NVML present but unusable here: {exc}")
    if not devices:
        pytest.skip("NVML sees no GPU")
    return source, devices


def test_real_nvml_reports_every_gpu_with_sane_memory() -> None:
    source, devices = nvml_devices()
    try:
        for device in devices:
            assert device.vendor == "nvidia"
            assert device.name
            assert device.error is None
            if device.vram_total_gb is not None:  # unified-memory systems report none
                assert device.vram_total_gb > 0
                assert device.vram_available_gb is not None
                assert 0 <= device.vram_available_gb <= device.vram_total_gb
    finally:
        source.close()


def test_real_nvml_initialises_once_for_many_reads() -> None:
    source, _ = nvml_devices()
    try:
        for _ in range(5):
            source.read()
        assert source.init_calls == 1
    finally:
        source.close()


def test_real_nvidia_smi_agrees_with_nvml() -> None:
    if which("nvidia-smi") is None:
        pytest.skip("no nvidia-smi here")
    source, from_nvml = nvml_devices()
    source.close()
    from_smi = NvidiaSmiSource().read(timeout_s=30)
    assert [d.name for d in from_smi] == [d.name for d in from_nvml]
    for smi, nvml in zip(from_smi, from_nvml, strict=True):
        if smi.vram_total_gb is None or nvml.vram_total_gb is None:
            continue
        assert abs(smi.vram_total_gb - nvml.vram_total_gb) <= 0.01


def test_real_gpu_metrics_sample_is_ok_and_then_served_from_cache() -> None:
    _, devices = nvml_devices()
    gpu = GpuMetrics(timeout_s=30, max_age_s=60)
    try:
        sample = gpu.sample()
        assert sample.state == "ok", sample.error
        keys = gpu_keys(sample)
        assert keys["gpu_type"] == "nvidia"
        assert keys["gpu_count"] >= len(devices)
        started = time.perf_counter()
        gpu.sample()
        assert time.perf_counter() - started < 0.001
    finally:
        gpu.close()


# -- depth readings: NVML against nvidia-smi ---------------------------------------------------

SMI_TIMEOUT_S = 30.0
UNKNOWN_SMI = re.compile(r"^\[.*\]$|^N/A$")  # [N/A], [Not Supported], ...


def smi_stdout(*args: str) -> str:
    """nvidia-smi's output for ``args``; skips the test without the tool."""
    if which("nvidia-smi") is None:
        pytest.skip("no nvidia-smi here")
    done = run_bounded(["nvidia-smi", *args], SMI_TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def smi_gpus(*fields: str) -> list[list[str | None]]:
    """One row per GPU of ``--query-gpu=<fields>``; ``None`` for an unknown value."""
    out = smi_stdout(f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits")
    rows = [[None if UNKNOWN_SMI.match(v.strip()) else v.strip() for v in line.split(",")]
            for line in out.splitlines() if line.strip()]
    assert all(len(row) == len(fields) for row in rows), out
    return rows


def read_nvml() -> tuple[GpuDevice, ...]:
    source, devices = nvml_devices()
    source.close()
    return devices


def assert_between(seen: set[object], before: set[object], after: set[object]) -> None:
    """``seen`` was read between ``before`` and ``after``: it holds at least what was there
    both times and nothing that was there neither time."""
    assert before & after <= seen <= before | after, (seen, before, after)


def test_real_nvml_uuids_match_nvidia_smi() -> None:
    nvml = read_nvml()
    smi = smi_gpus("uuid")
    assert [row[0] for row in smi] == [d.uuid for d in nvml]


def test_real_nvml_power_draw_is_close_to_nvidia_smi() -> None:
    nvml = read_nvml()
    smi = smi_gpus("power.draw")
    compared = 0
    for device, (draw,) in zip(nvml, smi, strict=True):
        if draw is None or device.power_draw_w is None:
            continue
        smi_w = float(draw)
        tolerance = max(10.0, 0.15 * max(smi_w, device.power_draw_w))
        assert abs(smi_w - device.power_draw_w) <= tolerance, (device.index, smi_w)
        compared += 1
    if not compared:
        pytest.skip("no GPU here tells its power draw")


def test_real_nvml_power_limit_equals_nvidia_smi() -> None:
    nvml = read_nvml()
    smi = smi_gpus("enforced.power.limit")
    compared = 0
    for device, (limit,) in zip(nvml, smi, strict=True):
        if limit is None or device.power_limit_w is None:
            continue
        assert abs(float(limit) - device.power_limit_w) <= 1.0, (device.index, limit)
        compared += 1
    if not compared:
        pytest.skip("no GPU here tells its power limit")


def test_real_nvml_throttle_reasons_match_nvidia_smi() -> None:
    before = read_nvml()
    smi = smi_gpus("clocks_throttle_reasons.active")
    after = read_nvml()
    compared = 0
    for first, (mask,), second in zip(before, smi, after, strict=True):
        if mask is None or first.throttle_reasons is None or second.throttle_reasons is None:
            continue
        assert_between(set(throttle_names(int(mask, 16))), set(first.throttle_reasons),
                       set(second.throttle_reasons))
        compared += 1
    if not compared:
        pytest.skip("no GPU here tells its throttle reasons")


def nvml_pids(devices: tuple[GpuDevice, ...]) -> set[object]:
    return {p.pid for d in devices for p in d.processes or ()}


def test_real_nvml_processes_match_nvidia_smi() -> None:
    """nvidia-smi's compute apps are among NVML's processes (which add graphics ones), and
    every process NVML saw before and after is in nvidia-smi's full list (``-q -d PIDS``,
    compute and graphics)."""
    before = read_nvml()
    if any(d.processes is None for d in before):
        pytest.skip("NVML does not list the processes of every GPU here")
    compute = smi_stdout("--query-compute-apps=pid", "--format=csv,noheader")
    every = smi_stdout("-q", "-d", "PIDS")
    after = read_nvml()
    smi_compute: set[object] = {int(line) for line in compute.split() if line.isdigit()}
    smi_all: set[object] = {int(pid) for pid in re.findall(r"Process ID\s*:\s*(\d+)", every)}
    first, second = nvml_pids(before), nvml_pids(after)
    assert smi_compute <= first | second, (smi_compute, first, second)
    assert first & second <= smi_all, (smi_all, first, second)


def test_real_nvml_reads_every_gpu_without_field_errors() -> None:
    for device in read_nvml():
        assert device.field_errors == (), (device.index, device.field_errors)
