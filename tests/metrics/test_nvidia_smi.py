"""nvidia-smi: parsing its CSV query output, exit statuses, and running it (bounded)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from chiffon_worker.errors import GpuProbeError, GpuSourceUnavailable, ProbeTimeout
from chiffon_worker.metrics.gpu_types import GpuDevice
from chiffon_worker.metrics.nvidia_smi import (
    NvidiaSmiSource,
    parse_line,
    parse_query_output,
)
from tests.fakes import nvidia_smi as fake


def gib(mib: float) -> float:
    return round(mib / 1024, 3)


def smi_device(index: int, name: str, total: float | None, free: float | None,
               util: float | None, temp: float | None) -> GpuDevice:
    return GpuDevice(index=index, vendor="nvidia", name=name,
                     vram_total_gb=None if total is None else gib(total),
                     vram_available_gb=None if free is None else gib(free),
                     utilization_percent=util, temperature_c=temp, source="nvidia-smi")


@pytest.mark.parametrize(("line", "expected"), [
    ("0, NVIDIA GeForce RTX 4090, 24564, 23791, 2, 38",
     smi_device(0, "NVIDIA GeForce RTX 4090", 24564, 23791, 2.0, 38.0)),
    ("1, NVIDIA GeForce RTX 3090, 24576, 24245, 0, 31",
     smi_device(1, "NVIDIA GeForce RTX 3090", 24576, 24245, 0.0, 31.0)),
    ("0, NVIDIA A100-SXM4-80GB, 81920, 45383, [N/A], 33",
     smi_device(0, "NVIDIA A100-SXM4-80GB", 81920, 45383, None, 33.0)),
    ("0, NVIDIA GB10, [N/A], [N/A], 3, 41",
     smi_device(0, "NVIDIA GB10", None, None, 3.0, 41.0)),
    ("2, Tesla T4, 15360, 15101, [Not Supported], [Not Supported]",
     smi_device(2, "Tesla T4", 15360, 15101, None, None)),
    ("0, NVIDIA RTX A2000, 6138, [Insufficient Permissions], 7, 50",
     smi_device(0, "NVIDIA RTX A2000", 6138, None, 7.0, 50.0)),
    ("  3, NVIDIA L4, 23034, 22700, 100, 71  ",
     smi_device(3, "NVIDIA L4", 23034, 22700, 100.0, 71.0)),
], ids=["rtx4090", "rtx3090", "mig-util-na", "unified-memory-na", "not-supported",
        "insufficient-permissions", "surrounding-space"])
def test_parse_line_reads_each_field_with_placeholders_as_none(
        line: str, expected: GpuDevice) -> None:
    assert parse_line(line) == expected


@pytest.mark.parametrize("line", [
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.",
    "0, NVIDIA GeForce RTX 4090, 24564, 23791, 2",
    "zero, NVIDIA GeForce RTX 4090, 24564, 23791, 2, 38",
    "0, NVIDIA GeForce RTX 4090, 24 GiB, 23791, 2, 38",
    "0, , 24564, 23791, 2, 38",
    "0, NVIDIA GeForce RTX 4090, 24564, 23791, 2, hot",
], ids=["prose", "too-few-fields", "bad-index", "bad-memory", "empty-name", "bad-temp"])
def test_parse_line_rejects_garbage_naming_the_line(line: str) -> None:
    with pytest.raises(GpuProbeError) as info:
        parse_line(line)
    assert repr(line.strip()) in str(info.value) or line in str(info.value)


def test_parse_query_output_reads_every_line_and_ignores_blank_ones() -> None:
    devices = parse_query_output(fake.TWO_GPUS + "\n\n")
    assert [d.index for d in devices] == [0, 1]
    assert [d.vram_total_gb for d in devices] == [gib(24564), gib(24576)]


def test_parse_query_output_of_nothing_is_no_device() -> None:
    assert parse_query_output("") == ()


def test_source_reports_both_gpus_of_the_fake_tool(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.printing(tmp_path, fake.TWO_GPUS).install(monkeypatch)
    assert NvidiaSmiSource().read(timeout_s=5) == (
        smi_device(0, "NVIDIA GeForce RTX 4090", 24564, 23791, 2.0, 38.0),
        smi_device(1, "NVIDIA GeForce RTX 3090", 24576, 24245, 0.0, 31.0),
    )


def test_source_reports_mig_utilization_as_unknown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.printing(tmp_path, fake.MIG_A100).install(monkeypatch)
    (device,) = NvidiaSmiSource().read(timeout_s=5)
    assert device.utilization_percent is None
    assert device.vram_available_gb == gib(45383)


def test_source_reports_unified_memory_as_unknown_vram(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.printing(tmp_path, fake.UNIFIED_MEMORY).install(monkeypatch)
    (device,) = NvidiaSmiSource().read(timeout_s=5)
    assert (device.vram_total_gb, device.vram_available_gb) == (None, None)


@pytest.mark.parametrize(("code", "meaning"), [
    (4, "permission denied"),
    (9, "NVIDIA driver is not loaded"),
    (12, "NVML shared library not found"),
    (15, "GPU is lost"),
    (18, "driver/library version mismatch"),
    (255, "unspecified error"),
])
def test_each_documented_exit_status_is_a_specific_probe_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, meaning: str) -> None:
    fake.failing(tmp_path, code).install(monkeypatch)
    with pytest.raises(GpuProbeError) as info:
        NvidiaSmiSource().read(timeout_s=5)
    text = str(info.value)
    assert meaning in text
    assert f"(exit {code})" in text
    stdout, stderr = fake.EXIT_MESSAGES[code]
    assert (stdout or stderr) in text  # the tool's own message, wherever it printed it


def test_version_mismatch_message_printed_on_stdout_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.failing(tmp_path, 18).install(monkeypatch)
    with pytest.raises(GpuProbeError, match="Driver/library version mismatch"):
        NvidiaSmiSource().read(timeout_s=5)


def test_garbage_output_with_exit_zero_is_a_probe_error_naming_the_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.printing(tmp_path, fake.GARBAGE).install(monkeypatch)
    with pytest.raises(GpuProbeError, match="couldn't find libnvidia-ml"):
        NvidiaSmiSource().read(timeout_s=5)


def test_missing_tool_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GpuSourceUnavailable):
        NvidiaSmiSource().read(timeout_s=5)


def test_hanging_tool_times_out_within_the_bound_and_is_killed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = fake.sleeping(tmp_path)
    tool.install(monkeypatch)
    started = time.monotonic()
    with pytest.raises(ProbeTimeout):
        NvidiaSmiSource().read(timeout_s=0.3)
    assert time.monotonic() - started < 0.3 + 0.5
    assert fake.running(tool.marker) == []
