"""A GPU's health: what makes it degraded or unhealthy, and that it recovers by itself."""

from __future__ import annotations

from dataclasses import replace

import pytest

from chiffon_worker.metrics.gpu_health import (
    DEGRADING_THROTTLE,
    THROTTLE_BITS,
    assess,
    throttle_names,
)
from chiffon_worker.metrics.gpu_types import GpuDevice

HEALTHY = GpuDevice(index=0, vendor="nvidia", name="NVIDIA GeForce RTX 4090",
                    vram_total_gb=23.988, vram_available_gb=23.2, utilization_percent=2.0,
                    temperature_c=38.0, source="nvml", throttle_reasons=(),
                    ecc_uncorrected_volatile=None)


def test_a_device_with_nothing_wrong_is_ok() -> None:
    assert (assess(HEALTHY).health, assess(HEALTHY).health_reason) == ("ok", None)


def test_a_device_that_failed_is_unhealthy_with_its_error() -> None:
    failed = GpuDevice.failed(1, "nvidia", "NVIDIA GPU", "nvml", "NVML: GPU requires reset")
    assert (assess(failed).health, assess(failed).health_reason) == (
        "unhealthy", "NVML: GPU requires reset")


def test_uncorrected_ecc_errors_make_a_device_unhealthy() -> None:
    device = assess(replace(HEALTHY, ecc_uncorrected_volatile=2))
    assert device.health == "unhealthy"
    assert device.health_reason == ("2 uncorrected ECC error(s) since the driver loaded "
                                    "(reset the GPU)")


@pytest.mark.parametrize("reason", sorted(DEGRADING_THROTTLE))
def test_a_slowdown_makes_a_device_degraded(reason: str) -> None:
    device = assess(replace(HEALTHY, throttle_reasons=("gpu_idle", reason)))
    assert (device.health, device.health_reason) == ("degraded", f"throttled: {reason}")


@pytest.mark.parametrize("reason", ["gpu_idle", "sw_power_cap", "applications_clocks_setting",
                                    "sync_boost", "display_clock_setting"])
def test_normal_clock_reasons_leave_a_device_ok(reason: str) -> None:
    assert assess(replace(HEALTHY, throttle_reasons=(reason,))).health == "ok"


def test_a_failed_reading_makes_a_device_degraded_naming_the_field() -> None:
    device = assess(replace(HEALTHY, power_draw_w=None,
                            field_errors=("power_draw_w: Unknown Error",)))
    assert (device.health, device.health_reason) == (
        "degraded", "unreadable: power_draw_w: Unknown Error")


def test_health_is_recomputed_from_each_reading_so_it_recovers_when_the_fault_clears() -> None:
    hot = assess(replace(HEALTHY, throttle_reasons=("hw_thermal_slowdown",)))
    cooled = assess(replace(hot, throttle_reasons=()))
    assert (hot.health, cooled.health, cooled.health_reason) == ("degraded", "ok", None)


def test_unhealthy_outranks_degraded() -> None:
    device = assess(replace(HEALTHY, ecc_uncorrected_volatile=1,
                            throttle_reasons=("hw_slowdown",)))
    assert device.health == "unhealthy"


def test_throttle_masks_are_named_bit_by_bit() -> None:
    mask = 0x4 | 0x40
    assert throttle_names(mask) == ("sw_power_cap", "hw_thermal_slowdown")
    assert throttle_names(0) == ()
    assert [throttle_names(bit) for bit, _ in THROTTLE_BITS] == [
        (name,) for _, name in THROTTLE_BITS]


def test_unknown_throttle_bits_are_kept_as_hex() -> None:
    assert throttle_names(0x1 | 0x400) == ("gpu_idle", "0x400")


def test_a_process_list_the_agent_could_not_read_leaves_a_device_ok() -> None:
    device = assess(replace(HEALTHY, processes=None,
                            field_errors=("processes: scan incomplete",)))
    assert (device.health, device.health_reason) == ("ok", None)
