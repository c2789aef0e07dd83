"""The real NVML binding and the real nvidia-smi, on a machine that has an NVIDIA GPU.

Every test here is marked ``gpu`` and skips cleanly where the library, the tool or the
GPU is missing (``pytest -m gpu`` selects them on a GPU rig).
"""

from __future__ import annotations

import time

import pytest

from chiffon_worker.errors import GpuProbeError, GpuSourceUnavailable
from chiffon_worker.metrics.bounded_subprocess import which
from chiffon_worker.metrics.gpu import GpuMetrics
from chiffon_worker.metrics.gpu_types import GpuDevice, flat_gpu_keys
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
        keys = flat_gpu_keys(sample)
        assert keys["gpu_type"] == "nvidia"
        assert keys["gpu_count"] >= len(devices)
        started = time.perf_counter()
        gpu.sample()
        assert time.perf_counter() - started < 0.001
    finally:
        gpu.close()
