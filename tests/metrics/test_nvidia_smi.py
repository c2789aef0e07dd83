"""nvidia-smi: parsing its CSV query outputs, placeholders, exit statuses, the old-driver
fallback, the process query, and running both commands within one time bound."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from chiffon_worker.errors import GpuProbeError, GpuSourceUnavailable, ProbeTimeout
from chiffon_worker.metrics.bounded_subprocess import REAP_GRACE_S
from chiffon_worker.metrics.gpu_types import GpuDevice, GpuProcess
from chiffon_worker.metrics.nvidia_smi import (
    QUERY_ARGS,
    QUERY_FIELDS,
    SHORT_FIELDS,
    NvidiaSmiSource,
    parse_compute_apps,
    parse_line,
    parse_query_output,
)
from tests.fakes import nvidia_smi as fake


def gib(mib: float) -> float:
    return round(mib / 1024, 3)


def smi_device(index: int, name: str, total: float | None, free: float | None,
               util: float | None, temp: float | None) -> GpuDevice:
    """A device as the six-field query gives it (memory in MiB here, GiB in the device)."""
    return GpuDevice(index=index, vendor="nvidia", name=name,
                     vram_total_gb=None if total is None else gib(total),
                     vram_available_gb=None if free is None else gib(free),
                     utilization_percent=util, temperature_c=temp, source="nvidia-smi")


# The devices in fake.LINE_4090 / fake.LINE_3090, field by field.
RTX4090 = replace(smi_device(0, "NVIDIA GeForce RTX 4090", 24564, 23791, 2.0, 38.0),
                  uuid=fake.UUID_4090, power_draw_w=31.42, power_limit_w=450.0,
                  throttle_reasons=(), ecc_uncorrected_volatile=None)
RTX3090 = replace(smi_device(1, "NVIDIA GeForce RTX 3090", 24576, 24245, 0.0, 31.0),
                  uuid=fake.UUID_3090, power_draw_w=22.17, power_limit_w=350.0,
                  throttle_reasons=("gpu_idle",), ecc_uncorrected_volatile=None)
# Each field of the query that holds a reading, and its name in the snapshot.
READING_FIELDS = [
    ("memory.total", "vram_total_gb"),
    ("memory.free", "vram_available_gb"),
    ("utilization.gpu", "utilization_percent"),
    ("temperature.gpu", "temperature_c"),
    ("uuid", "uuid"),
    ("power.draw", "power_draw_w"),
    ("enforced.power.limit", "power_limit_w"),
    ("clocks_throttle_reasons.active", "throttle_reasons"),
    ("ecc.errors.uncorrected.volatile.total", "ecc_uncorrected_volatile"),
]
FAULT_TEXTS = ["Unknown Error", "Insufficient Permissions", "Timeout", "Corrupted infoROM"]


def unknown(device: GpuDevice, attribute: str, field_errors: tuple[str, ...] = ()
            ) -> GpuDevice:
    """``device`` with ``attribute`` unknown (``None``) and ``field_errors`` recorded."""
    changes: dict[str, Any] = {attribute: None, "field_errors": field_errors}
    return replace(device, **changes)


def with_field(line: str, field: str, value: str) -> str:
    """``line`` of the full query with ``field`` set to ``value``."""
    parts = line.split(", ")
    parts[QUERY_FIELDS.index(field)] = value
    return ", ".join(parts)


def two_gpus_with_3090_field(field: str, value: str) -> str:
    return f"{fake.LINE_4090}\n{with_field(fake.LINE_3090, field, value)}\n"


# -- the query ----------------------------------------------------------------------------


def test_query_asks_the_six_original_fields_first_then_the_depth_fields() -> None:
    assert QUERY_ARGS == (
        "nvidia-smi",
        "--query-gpu=index,name,memory.total,memory.free,utilization.gpu,temperature.gpu,"
        "uuid,power.draw,enforced.power.limit,clocks_throttle_reasons.active,"
        "ecc.errors.uncorrected.volatile.total",
        "--format=csv,noheader,nounits",
    )


# -- parsing GPU lines ----------------------------------------------------------------------


@pytest.mark.parametrize(("line", "expected"), [
    (fake.LINE_4090, RTX4090),
    (fake.LINE_3090, RTX3090),
], ids=["rtx4090", "rtx3090"])
def test_parse_line_reads_every_field_of_the_full_query(line: str, expected: GpuDevice) -> None:
    assert parse_line(line) == expected


def test_throttle_mask_is_named_bit_by_bit() -> None:
    line = with_field(fake.LINE_4090, "clocks_throttle_reasons.active", "0x0000000000000044")
    assert parse_line(line).throttle_reasons == ("sw_power_cap", "hw_thermal_slowdown")


def test_uncorrected_ecc_count_is_an_integer() -> None:
    line = with_field(fake.LINE_4090, "ecc.errors.uncorrected.volatile.total", "3")
    assert parse_line(line).ecc_uncorrected_volatile == 3


@pytest.mark.parametrize(("line", "expected"), [
    ("0, NVIDIA GeForce RTX 4090, 24564, 23791, 2, 38",
     smi_device(0, "NVIDIA GeForce RTX 4090", 24564, 23791, 2.0, 38.0)),
    ("0, NVIDIA A100-SXM4-80GB, 81920, 45383, [N/A], 33",
     smi_device(0, "NVIDIA A100-SXM4-80GB", 81920, 45383, None, 33.0)),
    ("2, Tesla T4, 15360, 15101, [Not Supported], [Not Supported]",
     smi_device(2, "Tesla T4", 15360, 15101, None, None)),
    ("0, NVIDIA RTX A2000, 6138, [Insufficient Permissions], 7, 50",
     replace(smi_device(0, "NVIDIA RTX A2000", 6138, None, 7.0, 50.0),
             field_errors=("vram_available_gb: Insufficient Permissions",))),
    ("  3, NVIDIA L4, 23034, 22700, 100, 71  ",
     smi_device(3, "NVIDIA L4", 23034, 22700, 100.0, 71.0)),
], ids=["rtx4090", "mig-util-na", "not-supported", "insufficient-permissions",
        "surrounding-space"])
def test_parse_line_of_the_short_query_reads_its_six_fields(
        line: str, expected: GpuDevice) -> None:
    assert parse_line(line, SHORT_FIELDS) == expected


@pytest.mark.parametrize("text", FAULT_TEXTS)
@pytest.mark.parametrize(("field", "attribute"), READING_FIELDS)
def test_bracketed_error_leaves_only_that_field_unknown_with_a_field_error(
        field: str, attribute: str, text: str) -> None:
    devices = parse_query_output(two_gpus_with_3090_field(field, f"[{text}]"))
    assert devices == (
        RTX4090,
        unknown(RTX3090, attribute, (f"{attribute}: {text}",)),
    )


@pytest.mark.parametrize("value", ["[N/A]", "[Not Supported]", "N/A"])
@pytest.mark.parametrize(("field", "attribute"),
                         [fa for fa in READING_FIELDS if fa[0] != "memory.total"])
def test_not_told_placeholder_is_unknown_without_a_field_error(
        field: str, attribute: str, value: str) -> None:
    devices = parse_query_output(two_gpus_with_3090_field(field, value))
    assert devices == (RTX4090, unknown(RTX3090, attribute))


@pytest.mark.parametrize("text", ["GPU requires reset", "GPU is lost"])
@pytest.mark.parametrize("field", ["name", *(f for f, _ in READING_FIELDS)])
def test_gpu_needing_a_reset_or_lost_in_any_field_is_unhealthy_and_the_other_gpu_intact(
        field: str, text: str) -> None:
    healthy, broken = parse_query_output(two_gpus_with_3090_field(field, f"[{text}]"))
    assert healthy == RTX4090
    expected_error = f"nvidia-smi: {text}"
    assert (broken.index, broken.error, broken.health, broken.health_reason) == (
        RTX3090.index, expected_error, "unhealthy", expected_error)


def test_unknown_name_is_replaced_by_the_index_and_recorded() -> None:
    _, device = parse_query_output(two_gpus_with_3090_field("name", "[Unknown Error]"))
    assert (device.name, device.field_errors) == (
        f"NVIDIA GPU {RTX3090.index}", ("name: Unknown Error",))


@pytest.mark.parametrize("value", ["[N/A]", "[Not Supported]"])
def test_memory_not_told_on_a_gpu_that_answers_is_unified_memory(value: str) -> None:
    line = with_field(with_field(fake.LINE_4090, "memory.total", value), "memory.free", value)
    device = parse_line(line)
    assert device == replace(RTX4090, vram_total_gb=None, vram_available_gb=None,
                             unified=True)


def test_gb10_sample_is_unified_with_no_field_error() -> None:
    (device,) = parse_query_output(fake.UNIFIED_MEMORY)
    assert (device.unified, device.vram_total_gb, device.vram_available_gb,
            device.field_errors) == (True, None, None, ())


def test_memory_total_fault_is_a_field_error_not_unified_memory() -> None:
    device = parse_line(with_field(fake.LINE_4090, "memory.total", "[Unknown Error]"))
    assert (device.unified, device.field_errors) == (False, ("vram_total_gb: Unknown Error",))


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
        parse_line(line, SHORT_FIELDS)
    assert repr(line.strip()) in str(info.value)


@pytest.mark.parametrize(("field", "value"), [
    ("clocks_throttle_reasons.active", "throttled"),
    ("ecc.errors.uncorrected.volatile.total", "1.5"),
    ("power.draw", "31.42 W"),
])
def test_parse_line_rejects_a_depth_field_that_is_no_reading(field: str, value: str) -> None:
    line = with_field(fake.LINE_4090, field, value)
    with pytest.raises(GpuProbeError, match=field):
        parse_line(line)


def test_parse_query_output_reads_every_line_and_ignores_blank_ones() -> None:
    assert parse_query_output(fake.TWO_GPUS + "\n\n") == (RTX4090, RTX3090)


def test_parse_query_output_of_nothing_is_no_device() -> None:
    assert parse_query_output("") == ()


def test_garbage_line_with_a_readable_index_is_a_failed_device_beside_the_good_one() -> None:
    bad = with_field(fake.LINE_3090, "temperature.gpu", "hot")
    good, failed = parse_query_output(f"{fake.LINE_4090}\n{bad}\n")
    assert good == RTX4090
    assert (failed.index, failed.health) == (RTX3090.index, "unhealthy")
    assert failed.error is not None and repr(bad) in failed.error


def test_garbage_line_without_an_index_is_skipped_and_the_good_line_reported() -> None:
    assert parse_query_output(f"WARNING: infoROM is corrupted\n{fake.LINE_4090}\n") == (
        RTX4090,)


def test_output_in_which_no_line_parses_is_a_probe_error_naming_the_line() -> None:
    with pytest.raises(GpuProbeError, match="couldn't find libnvidia-ml"):
        parse_query_output(fake.GARBAGE)


# -- parsing process lines ------------------------------------------------------------------


def test_parse_compute_apps_groups_processes_by_gpu_uuid_in_gib() -> None:
    assert parse_compute_apps(fake.APPS_ON_4090) == {fake.UUID_4090: (
        GpuProcess(pid=4242, name="/usr/bin/python3", memory_gb=gib(1536)),
        GpuProcess(pid=5151, name="/usr/local/bin/ollama", memory_gb=gib(20480)),
    )}


def test_parse_compute_apps_reads_memory_not_told_as_unknown() -> None:
    assert parse_compute_apps(fake.APPS_UNDER_MIG) == {fake.UUID_A100: (
        GpuProcess(pid=6161, name="/usr/bin/python3", memory_gb=None),)}


def test_parse_compute_apps_of_nothing_is_no_process() -> None:
    assert parse_compute_apps("") == {}


def test_parse_compute_apps_rejects_a_line_without_a_pid() -> None:
    line = f"{fake.UUID_4090}, [N/A], /usr/bin/python3, 1536"
    with pytest.raises(GpuProbeError, match="bad process line"):
        parse_compute_apps(line + "\n")


# -- the source, running a fake nvidia-smi --------------------------------------------------


def test_source_reports_both_gpus_with_processes_mapped_by_uuid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.nvidia_smi(tmp_path, fake.TWO_GPUS, fake.APPS_ON_4090).install(monkeypatch)
    assert NvidiaSmiSource().read(timeout_s=5) == (
        replace(RTX4090, processes=(
            GpuProcess(pid=4242, name="/usr/bin/python3", memory_gb=gib(1536)),
            GpuProcess(pid=5151, name="/usr/local/bin/ollama", memory_gb=gib(20480)))),
        replace(RTX3090, processes=()),
    )


def test_source_reports_mig_utilization_and_process_memory_as_unknown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.nvidia_smi(tmp_path, fake.MIG_A100, fake.APPS_UNDER_MIG).install(monkeypatch)
    (device,) = NvidiaSmiSource().read(timeout_s=5)
    assert (device.utilization_percent, device.vram_available_gb) == (None, gib(45383))
    assert device.processes == (GpuProcess(pid=6161, name="/usr/bin/python3", memory_gb=None),)


def test_source_reports_unified_memory_without_field_errors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.nvidia_smi(tmp_path, fake.UNIFIED_MEMORY).install(monkeypatch)
    (device,) = NvidiaSmiSource().read(timeout_s=5)
    assert (device.unified, device.vram_total_gb, device.field_errors) == (True, None, ())


def test_source_reports_the_gpu_needing_a_reset_and_the_healthy_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = two_gpus_with_3090_field("power.draw", "[GPU requires reset]")
    fake.nvidia_smi(tmp_path, gpus).install(monkeypatch)
    healthy, broken = NvidiaSmiSource().read(timeout_s=5)
    assert healthy == replace(RTX4090, processes=())
    assert (broken.error, broken.health) == ("nvidia-smi: GPU requires reset", "unhealthy")


def test_exit_15_with_partial_output_reports_the_healthy_gpu_and_marks_the_lost_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.nvidia_smi(tmp_path, fake.LINE_4090 + "\n", stderr=fake.LOST_GPU_STDERR,
                    exit_code=15).install(monkeypatch)
    healthy, lost = NvidiaSmiSource().read(timeout_s=5)
    assert healthy == replace(RTX4090, processes=())
    address = fake.LOST_BUS_ID.lower()
    reason = fake.LOST_GPU_STDERR.split(": ", 1)[1].strip()
    assert (lost.index, lost.name, lost.extra) == (
        RTX4090.index + 1, f"NVIDIA GPU {address}", {"pci_address": address})
    assert (lost.error, lost.health, lost.health_reason) == (
        f"nvidia-smi: {reason}", "unhealthy", f"nvidia-smi: {reason}")


def test_process_query_complaining_only_of_the_lost_gpu_still_maps_the_healthy_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.nvidia_smi(tmp_path, fake.LINE_4090 + "\n", fake.APPS_ON_4090,
                    stderr=fake.LOST_GPU_STDERR, exit_code=15,
                    apps_stderr=fake.LOST_GPU_STDERR, apps_exit_code=15).install(monkeypatch)
    healthy, lost = NvidiaSmiSource().read(timeout_s=5)
    assert healthy == replace(RTX4090, processes=parse_compute_apps(fake.APPS_ON_4090)[
        fake.UUID_4090])
    assert (lost.processes, lost.field_errors) == (None, ())


@pytest.mark.parametrize(("code", "meaning"), [
    (4, "permission denied"),
    (9, "NVIDIA driver is not loaded"),
    (12, "NVML shared library not found"),
    (15, "GPU is lost"),
    (18, "driver/library version mismatch"),
    (255, "unspecified error"),
])
def test_each_documented_exit_status_without_gpu_lines_is_a_specific_probe_error(
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


def test_old_driver_gets_the_short_query_and_the_long_one_is_never_asked_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = fake.old_driver(tmp_path, fake.TWO_GPUS_SHORT)
    tool.install(monkeypatch)
    source = NvidiaSmiSource()
    reads = 2
    for _ in range(reads):
        assert source.read(timeout_s=5) == (
            smi_device(0, "NVIDIA GeForce RTX 4090", 24564, 23791, 2.0, 38.0),
            smi_device(1, "NVIDIA GeForce RTX 3090", 24576, 24245, 0.0, 31.0),
        )
    assert tool.runs_with("clocks_throttle_reasons") == 1
    assert tool.runs_with("--query-gpu=") == 1 + reads


def test_old_driver_runs_no_process_query_and_records_no_field_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = fake.old_driver(tmp_path, fake.TWO_GPUS_SHORT)
    tool.install(monkeypatch)
    devices = NvidiaSmiSource().read(timeout_s=5)
    assert [(d.processes, d.field_errors) for d in devices] == [(None, ())] * 2
    assert tool.runs_with(fake.APPS_QUERY) == 0


def test_failing_process_query_marks_only_the_processes_field(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.nvidia_smi(tmp_path, fake.TWO_GPUS, apps_stderr="Insufficient Permissions\n",
                    apps_exit_code=4).install(monkeypatch)
    devices = NvidiaSmiSource().read(timeout_s=5)
    assert [replace(d, field_errors=()) for d in devices] == [RTX4090, RTX3090]
    for device in devices:
        (error,) = device.field_errors
        assert error.startswith("processes: ") and "(exit 4)" in error


def test_hanging_process_query_is_cut_at_the_read_timeout_and_only_processes_unknown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = fake.nvidia_smi(tmp_path, fake.TWO_GPUS, apps_seconds=600)
    tool.install(monkeypatch)
    timeout_s = 0.5
    try:
        started = time.monotonic()
        devices = NvidiaSmiSource().read(timeout_s=timeout_s)
        assert time.monotonic() - started < timeout_s + REAP_GRACE_S
        assert [replace(d, field_errors=()) for d in devices] == [RTX4090, RTX3090]
        assert all(d.field_errors[0].startswith("processes: ") and "timed out" in
                   d.field_errors[0] for d in devices)
        assert fake.running(tool.marker) == []
    finally:
        fake.kill_all(tool.marker)


def test_no_time_left_after_the_gpu_query_skips_the_process_query(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = fake.nvidia_smi(tmp_path, fake.TWO_GPUS, fake.APPS_ON_4090)
    tool.install(monkeypatch)
    timeout_s = 5.0

    def clock() -> float:
        """Time that jumps past the whole timeout once the GPU query has run."""
        return 2 * timeout_s * tool.calls

    devices = NvidiaSmiSource(clock=clock).read(timeout_s=timeout_s)
    assert [(d.processes, d.field_errors) for d in devices] == [
        (None, ("processes: no time left",))] * 2
    assert tool.runs_with(fake.APPS_QUERY) == 0


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
