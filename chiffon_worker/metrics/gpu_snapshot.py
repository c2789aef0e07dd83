"""The snapshot's GPU keys, built from one GPU sample and the host's memory figures.

Where a heartbeat's GPU part is built: the flat summary the orchestrator routes on, the
``gpus`` list and ``gpu_probe``.

* **Unified memory.** A GPU that uses system memory (``unified``: GB10-class NVIDIA,
  AMD APUs) has no VRAM of its own to report, so NVIDIA's advice (followed by ollama,
  nvtop, gpud) is used: what a job can get is the host's available memory (here the
  cgroup-capped figure the snapshot's ``memory_available_gb`` carries). An AMD APU's
  carve-out VRAM is added to its GTT share: ``total = carve-out + GTT``, ``available =
  free carve-out + min(free GTT, host available)``; the carve-out alone stays in
  ``carveout_total_gb`` / ``carveout_available_gb``.
* **Primary GPU.** The device with the most VRAM among those not ``unhealthy``; with
  only unhealthy GPUs there is no usable one and the flat VRAM is 0 (known: nothing can
  be promised there).
* **Unknown is not zero.** ``gpu_vram_known`` is False when the primary GPU does not tell
  its free VRAM (Intel i915, a runtime-suspended dGPU): the flat number is then 0 for
  readers of schema 1, and routing treats it as "cannot promise", never as free or full.

Units: GiB, watts, counts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from chiffon_worker.metrics.gpu_types import (
    GpuDevice,
    GpuSample,
    Health,
    worse,
)


@dataclass(frozen=True)
class HostMemory:
    """The host memory a job can get (GiB), as the snapshot reports it (cgroup-capped)."""

    total_gb: float
    available_gb: float


def with_host_memory(device: GpuDevice, host: HostMemory | None) -> GpuDevice:
    """A unified-memory device with its memory figures filled from the host's; any
    other device (or no host figures) unchanged."""
    if not device.unified or host is None or device.error is not None:
        return device
    extra = dict(device.extra)
    carve_total = device.vram_total_gb or 0.0
    carve_free = device.vram_available_gb or 0.0
    if device.vram_total_gb is not None:
        extra["carveout_total_gb"] = device.vram_total_gb
        extra["carveout_available_gb"] = device.vram_available_gb
    gtt_total = extra.get("gtt_total_gb")
    if isinstance(gtt_total, int | float):
        gtt_used = extra.get("gtt_used_gb")
        gtt_free = gtt_total - (gtt_used if isinstance(gtt_used, int | float) else 0.0)
        shared_total, shared_free = float(gtt_total), min(max(0.0, gtt_free), host.available_gb)
    else:
        shared_total, shared_free = host.total_gb, host.available_gb
    total = round(carve_total + shared_total, 3)
    available = round(min(total, carve_free + shared_free), 3)
    return replace(device, vram_total_gb=total, vram_available_gb=available, extra=extra)


def primary(devices: tuple[GpuDevice, ...]) -> GpuDevice | None:
    """The usable device with the most known VRAM (unknown VRAM ranks last); ``None``
    without a device that is not unhealthy."""
    usable = [d for d in devices if d.health != "unhealthy"]
    if not usable:
        return None
    return max(usable, key=lambda d: (d.vram_total_gb is not None, d.vram_total_gb or 0.0,
                                      -d.index))


def _sum_known(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known), 1) if known else None


def fleet_health(devices: tuple[GpuDevice, ...]) -> tuple[Health | None, str | None]:
    """The worst health of the devices and its reason (``gpu <index>: <reason>``);
    ``(None, None)`` without devices."""
    health: Health | None = None
    reason: str | None = None
    for device in devices:
        if health is None or worse(device.health, health) != health:
            health = device.health
            reason = (f"gpu {device.index}: {device.health_reason}"
                      if device.health_reason else None)
    return health, reason


def process_keys(devices: tuple[GpuDevice, ...]) -> dict[str, Any]:
    """Counts of GPU processes (``None`` where no device lists its processes), the
    foreign ones, and the GPU memory foreign processes hold (GiB)."""
    listed = [d.processes for d in devices if d.processes is not None]
    if not listed:
        return {"gpu_processes": None, "gpu_foreign_processes": None,
                "gpu_foreign_memory_gb": None}
    processes = [p for group in listed for p in group]
    foreign = [p for p in processes if p.owner == "foreign"]
    return {
        "gpu_processes": len(processes),
        "gpu_foreign_processes": len(foreign),
        "gpu_foreign_memory_gb": round(sum(p.memory_gb or 0.0 for p in foreign), 3),
    }


def _vram_known(sample: GpuSample, main: GpuDevice | None) -> bool:
    """Whether the flat free-VRAM figure is a fact: a usable GPU that tells it, or no
    usable GPU at all (0 is then the truth), but not a probe that never answered."""
    if main is not None:
        return main.vram_available_gb is not None
    return not (sample.state == "timeout" and not sample.reading.devices)


#: The flat keys of a machine without a GPU (copied into each such snapshot: the common
#: case, kept cheap).
_NO_GPU: dict[str, Any] = {
    "gpu_vram_total_gb": 0.0, "gpu_vram_available_gb": 0.0, "gpu_vram_known": True,
    "gpu_type": "none", "gpu_count": 0, "gpu_health": "none", "gpu_health_reason": None,
    "gpu_power_draw_w": None, "gpu_power_limit_w": None, "gpu_processes": None,
    "gpu_foreign_processes": None, "gpu_foreign_memory_gb": None,
    "gpu_temperature_max_c": None,
}


def _probe_keys(sample: GpuSample) -> dict[str, Any]:
    return {"state": sample.state, "source": sample.reading.source,
            "age_seconds": round(sample.age_seconds, 3), "error": sample.error}


def gpu_keys(sample: GpuSample, host: HostMemory | None = None) -> dict[str, Any]:
    """The snapshot's GPU keys (flat summary, ``gpus`` list and ``gpu_probe``)."""
    if not sample.reading.devices and sample.state != "timeout":
        return {**_NO_GPU, "gpus": [], "gpu_probe": _probe_keys(sample)}
    devices = tuple(with_host_memory(d, host) for d in sample.reading.devices)
    main = primary(devices)
    health, reason = fleet_health(devices)
    keys: dict[str, Any] = {
        "gpu_vram_total_gb": (main.vram_total_gb or 0.0) if main else 0.0,
        "gpu_vram_available_gb": (main.vram_available_gb or 0.0) if main else 0.0,
        "gpu_vram_known": _vram_known(sample, main),
        "gpu_type": (main or devices[0]).vendor if devices else "none",
        "gpu_count": len(devices),
        "gpu_health": health or "none",
        "gpu_health_reason": reason,
        "gpu_power_draw_w": _sum_known([d.power_draw_w for d in devices]),
        "gpu_power_limit_w": _sum_known([d.power_limit_w for d in devices]),
        **process_keys(devices),
        "gpu_temperature_max_c": max((d.temperature_c for d in devices
                                      if d.temperature_c is not None), default=None),
        "gpus": [d.to_dict() for d in devices],
        "gpu_probe": _probe_keys(sample),
    }
    return keys
