"""A GPU's health, from what its source read: the one place the rules live.

``ok``: nothing wrong. ``degraded``: it works but is slowed (thermal or hardware
slowdown, power brake) or some of its readings failed (not counting its process list,
which says what the agent could not see, not how the GPU is). ``unhealthy``: lost, needs a
reset, or has uncorrected ECC errors since the driver loaded (DCGM's and the Kubernetes
device plugin's rule): no work should be placed on it. Health is computed afresh on
every probe, so it recovers by itself when the fault clears.

Clock-throttle reasons are NVML's ``nvmlClocksEventReasons`` bit mask (nvidia-smi's
``clocks_throttle_reasons.active`` is the same mask in hex); :func:`throttle_names` turns
it into names.
"""

from __future__ import annotations

from dataclasses import replace

from chiffon_worker.metrics.gpu_types import GpuDevice, Health

#: NVML's clock-event (throttle) reason bits, by name.
THROTTLE_BITS: tuple[tuple[int, str], ...] = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)
#: Throttle reasons that make a GPU ``degraded``: it runs slower than it should. Idle,
#: application clocks, sync boost and the software power cap are normal operation.
DEGRADING_THROTTLE = frozenset({"hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown",
                                "hw_power_brake_slowdown"})


#: Field errors about the process list say what the agent could not see (a /proc scan out
#: of time, a tool without permission), not that the GPU is unwell: they do not degrade.
PROCESSES_FIELD = "processes:"


def throttle_names(mask: int) -> tuple[str, ...]:
    """The active reasons of an NVML throttle bit mask, by name; unknown bits as hex."""
    names = [name for bit, name in THROTTLE_BITS if mask & bit]
    known = 0
    for bit, _ in THROTTLE_BITS:
        known |= bit
    rest = mask & ~known
    bit = 1
    while rest:
        if rest & bit:
            names.append(hex(bit))
            rest &= ~bit
        bit <<= 1
    return tuple(names)


def health_of(device: GpuDevice) -> tuple[Health, str | None]:
    """The health a device's readings show, with the reason (``None`` when ``ok``).

    Only the readings count, never a health set before: a source reports a GPU that is
    lost or needs a reset through ``error``."""
    if device.error is not None:
        return "unhealthy", device.error
    if device.ecc_uncorrected_volatile:
        return "unhealthy", (f"{device.ecc_uncorrected_volatile} uncorrected ECC error(s) "
                             "since the driver loaded (reset the GPU)")
    slowed = [r for r in device.throttle_reasons or () if r in DEGRADING_THROTTLE]
    if slowed:
        return "degraded", "throttled: " + ", ".join(slowed)
    faults = [e for e in device.field_errors if not e.startswith(PROCESSES_FIELD)]
    if faults:
        return "degraded", "unreadable: " + "; ".join(faults)
    return "ok", None


def assess(device: GpuDevice) -> GpuDevice:
    """The device with ``health`` and ``health_reason`` set from its readings."""
    health, reason = health_of(device)
    if health == device.health and reason == device.health_reason:
        return device
    return replace(device, health=health, health_reason=reason)
