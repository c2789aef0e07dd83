"""Intel GPUs from sysfs (i915 and xe).

For each ``<sysfs_root>/class/drm/card<N>`` whose ``device/vendor`` is ``0x8086`` the GPU
is reported as present, named from its PCI device id (``"Intel GPU 0xe20b"``). Mainline
i915/xe expose no VRAM size in sysfs, so VRAM is ``None`` unless the driver does tell:
``mem_info_vram_total`` (bytes), or xe's per-tile ``tile*/physical_vram_size_bytes``
(summed over tiles). Free VRAM is never exposed: ``vram_available_gb`` stays ``None``.
Temperature from ``hwmon/hwmon*/temp2_input`` (xe package) or ``temp1_input``,
millidegrees C in sysfs, degrees C out. Device index = the DRM card number ``N``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from chiffon_worker.errors import GpuSourceUnavailable
from chiffon_worker.metrics.drm import (
    card_number,
    drm_cards,
    hwmon_temperature,
)
from chiffon_worker.metrics.gpu_types import GpuDevice, bytes_to_gib
from chiffon_worker.metrics.sysfs import read_int, read_text

log = logging.getLogger(__name__)

SOURCE = "intel-sysfs"
INTEL_VENDOR_ID = "0x8086"
_XE_VRAM_GLOBS = ("tile*/physical_vram_size_bytes", "tile*/vram*/physical_vram_size_bytes")


def _vram_bytes(dev: Path) -> int | None:
    """Total VRAM in bytes where the driver exposes it, else ``None``."""
    total = read_int(dev / "mem_info_vram_total")
    if total is not None:
        return total
    sizes = [read_int(path) for pattern in _XE_VRAM_GLOBS for path in sorted(dev.glob(pattern))]
    known = [s for s in sizes if s is not None]
    return sum(known) if known else None


class IntelSysfsSource:
    """Intel GPUs under ``<sysfs_root>/class/drm`` (presence, name, VRAM if exposed, temp)."""

    name = SOURCE

    def __init__(self, sysfs_root: str = "/sys") -> None:
        self.sysfs_root = sysfs_root

    def _card(self, card: Path) -> GpuDevice:
        dev = card / "device"
        device_id = read_text(dev / "device") or "?"
        vram = _vram_bytes(dev)
        busy = read_int(dev / "gpu_busy_percent")
        return GpuDevice(
            index=card_number(card),
            vendor="intel",
            name=f"Intel GPU {device_id}",
            vram_total_gb=None if vram is None else bytes_to_gib(vram),
            vram_available_gb=None,
            utilization_percent=None if busy is None else float(busy),
            temperature_c=hwmon_temperature(dev, ("temp2_input", "temp1_input")),
            source=SOURCE,
        )

    def read(self, timeout_s: float = 0.0) -> tuple[GpuDevice, ...]:
        """Every Intel card (GiB, degC). A card that cannot be read carries ``error``.

        ``timeout_s`` is accepted for the common source interface (sysfs reads are not
        subprocesses). Raises ``GpuSourceUnavailable`` when there is no Intel card.
        """
        del timeout_s
        cards = drm_cards(self.sysfs_root, INTEL_VENDOR_ID)
        if not cards:
            raise GpuSourceUnavailable("no Intel GPU in sysfs")
        devices: list[GpuDevice] = []
        for card in cards:
            try:
                devices.append(self._card(card))
            except (OSError, ValueError) as exc:
                log.debug("Intel %s: %s", card, exc)
                devices.append(GpuDevice.failed(card_number(card), "intel", "Intel GPU", SOURCE,
                                                f"{card.name}: {exc}"))
        return tuple(devices)
