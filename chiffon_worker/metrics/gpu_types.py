"""Plain data shared by every GPU source and the probe runner. No I/O here.

Units: memory in GiB (2**30 bytes) as ``float``; temperature in degrees Celsius;
utilisation in percent (0-100). ``None`` means "the platform does not tell".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from chiffon_worker.snapshot import GIB

Vendor = Literal["nvidia", "amd", "intel"]
ProbeState = Literal["ok", "stale", "timeout", "error", "absent"]


def bytes_to_gib(value: int | float) -> float:
    """Bytes to GiB, rounded to 3 decimals (1 MiB resolution is plenty to schedule on)."""
    return round(float(value) / GIB, 3)


@dataclass(frozen=True)
class GpuDevice:
    """One GPU as one source saw it. ``error`` is set when this device alone failed."""

    index: int
    vendor: Vendor
    name: str
    vram_total_gb: float | None
    vram_available_gb: float | None
    utilization_percent: float | None
    temperature_c: float | None
    source: str
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failed(cls, index: int, vendor: Vendor, name: str, source: str, error: str
               ) -> GpuDevice:
        """A device that was found but could not be read: every reading unknown."""
        return cls(index=index, vendor=vendor, name=name, vram_total_gb=None,
                   vram_available_gb=None, utilization_percent=None, temperature_c=None,
                   source=source, error=error)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form used in the snapshot's ``gpus`` list."""
        out = asdict(self)
        extra = out.pop("extra")
        out.update(extra)
        return out


@dataclass(frozen=True)
class GpuReading:
    """What one complete probe found: the devices and the sources that answered."""

    devices: tuple[GpuDevice, ...]
    sources: tuple[str, ...]
    errors: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        """The sources joined with ``+`` (``"none"`` when nothing was found)."""
        return "+".join(self.sources) if self.sources else "none"


@dataclass(frozen=True)
class GpuSample:
    """A reading as delivered to a snapshot: the reading plus its probe state and age."""

    reading: GpuReading
    state: ProbeState
    age_seconds: float
    error: str | None = None


EMPTY_READING = GpuReading(devices=(), sources=())


def primary(devices: tuple[GpuDevice, ...]) -> GpuDevice | None:
    """The device with the most known VRAM; devices with unknown VRAM rank last."""
    if not devices:
        return None
    return max(devices, key=lambda d: (d.vram_total_gb is not None, d.vram_total_gb or 0.0,
                                       -d.index))


def flat_gpu_keys(sample: GpuSample) -> dict[str, Any]:
    """The snapshot's GPU keys (flat summary, ``gpus`` list and ``gpu_probe``) for a sample."""
    devices = sample.reading.devices
    main = primary(devices)
    return {
        "gpu_vram_total_gb": (main.vram_total_gb or 0.0) if main else 0.0,
        "gpu_vram_available_gb": (main.vram_available_gb or 0.0) if main else 0.0,
        "gpu_type": main.vendor if main else "none",
        "gpu_count": len(devices),
        "gpus": [d.to_dict() for d in devices],
        "gpu_probe": {
            "state": sample.state,
            "source": sample.reading.source,
            "age_seconds": round(sample.age_seconds, 3),
            "error": sample.error,
        },
    }
