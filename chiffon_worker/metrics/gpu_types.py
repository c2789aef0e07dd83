"""Plain data shared by every GPU source and the probe runner. No I/O here.

Units: memory in GiB (2**30 bytes) as ``float``; temperature in degrees Celsius;
utilisation in percent (0-100). ``None`` means "the platform does not tell".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from chiffon_worker.snapshot import GIB

Vendor = Literal["nvidia", "amd", "intel"]
ProbeState = Literal["ok", "stale", "timeout", "error", "absent"]
#: A GPU's health: ``ok``; ``degraded`` (works, but slowed or partly unreadable);
#: ``unhealthy`` (lost, needs a reset, or uncorrected memory errors: do not place work).
Health = Literal["ok", "degraded", "unhealthy"]
#: Whose a GPU process is: this agent's (the agent process or one of its descendants),
#: someone else's (a game, an ollama), or ``unknown`` (not classified yet).
ProcessOwner = Literal["agent", "foreign", "unknown"]
HEALTH_ORDER: tuple[Health, ...] = ("ok", "degraded", "unhealthy")


def bytes_to_gib(value: int | float) -> float:
    """Bytes to GiB, rounded to 3 decimals (1 MiB resolution is plenty to schedule on)."""
    return round(float(value) / GIB, 3)


def worse(a: Health, b: Health) -> Health:
    """The worse of two healths."""
    return a if HEALTH_ORDER.index(a) >= HEALTH_ORDER.index(b) else b


@dataclass(frozen=True)
class GpuProcess:
    """A process holding a context on one GPU.

    ``memory_gb``: GPU memory it uses (GiB; ``None`` where the platform does not tell, as
    under MIG or without permission). ``name``: its executable name (``None`` when the
    process is not visible here, e.g. from another PID namespace).
    """

    pid: int
    name: str | None
    memory_gb: float | None
    owner: ProcessOwner = "unknown"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form used in ``gpus[i].processes``."""
        return {"pid": self.pid, "name": self.name, "memory_gb": self.memory_gb,
                "owner": self.owner}


@dataclass(frozen=True)
class MigUnit:
    """One MIG instance of a GPU: a unit work is placed on, with its own memory (GiB)."""

    index: int
    name: str
    memory_total_gb: float | None
    memory_available_gb: float | None
    uuid: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form used in ``gpus[i].mig``."""
        return {"index": self.index, "name": self.name, "memory_total_gb": self.memory_total_gb,
                "memory_available_gb": self.memory_available_gb, "uuid": self.uuid}


@dataclass(frozen=True)
class GpuDevice:
    """One GPU as one source saw it.

    ``error`` is set when this device alone failed (it is then ``unhealthy``); readings a
    source could not take are ``None`` with the reason in ``field_errors``
    (``"power_draw_w: Unknown Error"``): unknown, never zero.

    Depth (``None``: this source does not tell): ``power_draw_w`` / ``power_limit_w``
    (watts; the limit is the one enforced), ``throttle_reasons`` (active clock-throttle
    reasons by name, see :mod:`.gpu_health`; ``()`` none), ``ecc_uncorrected_volatile``
    (uncorrected ECC errors since the driver loaded), ``processes`` (``()`` none).
    ``unified``: the GPU uses system memory (GB10-class NVIDIA, AMD APUs): its memory
    figures are filled from the host's available memory (:mod:`.gpu_snapshot`).
    ``mig``: the MIG instances when MIG is enabled. ``health`` / ``health_reason`` are
    set by :func:`.gpu_health.assess` once per probe, from the readings alone (a device
    with ``error`` is unhealthy).
    """

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
    uuid: str | None = None
    unified: bool = False
    power_draw_w: float | None = None
    power_limit_w: float | None = None
    throttle_reasons: tuple[str, ...] | None = None
    ecc_uncorrected_volatile: int | None = None
    processes: tuple[GpuProcess, ...] | None = None
    mig: tuple[MigUnit, ...] = ()
    field_errors: tuple[str, ...] = ()
    health: Health = "ok"
    health_reason: str | None = None

    @classmethod
    def failed(cls, index: int, vendor: Vendor, name: str, source: str, error: str
               ) -> GpuDevice:
        """A device that was found but could not be read: every reading unknown."""
        return cls(index=index, vendor=vendor, name=name, vram_total_gb=None,
                   vram_available_gb=None, utilization_percent=None, temperature_c=None,
                   source=source, error=error, health="unhealthy", health_reason=error)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form used in the snapshot's ``gpus`` list."""
        out: dict[str, Any] = {
            "index": self.index, "vendor": self.vendor, "name": self.name,
            "vram_total_gb": self.vram_total_gb, "vram_available_gb": self.vram_available_gb,
            "utilization_percent": self.utilization_percent,
            "temperature_c": self.temperature_c, "source": self.source, "error": self.error,
            "uuid": self.uuid, "unified": self.unified, "power_draw_w": self.power_draw_w,
            "power_limit_w": self.power_limit_w,
            "throttle_reasons": None if self.throttle_reasons is None
            else list(self.throttle_reasons),
            "ecc_uncorrected_volatile": self.ecc_uncorrected_volatile,
            "processes": None if self.processes is None
            else [p.to_dict() for p in self.processes],
            "mig": [m.to_dict() for m in self.mig],
            "field_errors": list(self.field_errors),
            "health": self.health, "health_reason": self.health_reason,
        }
        out.update(self.extra)
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
