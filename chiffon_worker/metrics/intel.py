"""Intel GPUs from sysfs (i915 and xe).

For each ``<sysfs_root>/class/drm/card<N>`` whose ``device/vendor`` is ``0x8086`` the GPU
is reported as present, named from its PCI device id (``"Intel GPU 0xe20b"``). Mainline
i915/xe expose no VRAM size in sysfs, so VRAM is ``None`` unless the driver does tell:
``mem_info_vram_total`` (bytes), or xe's per-tile ``tile*/physical_vram_size_bytes``
(summed over tiles). Free VRAM is never exposed: ``vram_available_gb`` stays ``None``.
Temperature from ``hwmon/hwmon*/temp2_input`` (xe package) or ``temp1_input``,
millidegrees C in sysfs, degrees C out. Device index = the DRM card number ``N``.

Power: the limit is hwmon ``power1_max`` (the sustained PL1 limit, microwatts; i915
documents 0 as "limit disabled", reported ``None``). The draw stays ``None``: i915/xe
expose only an energy counter (``energy1_input``, microjoules), and a draw needs two
readings apart in time, which a single probe does not take. Processes: DRM fdinfo
(:mod:`.drm_clients`), device-local memory (``local*`` i915, ``vram*`` xe) per process,
or on an integrated GPU (no local region) the system memory it maps. ``unified`` stays
False.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from chiffon_worker.errors import GpuSourceUnavailable
from chiffon_worker.metrics.drm import (
    card_number,
    drm_cards,
    hwmon_temperature,
    hwmon_watts,
    optional_reading,
)
from chiffon_worker.metrics.drm_clients import (
    DrmClientScanner,
    DrmScan,
    card_processes,
    region_bytes,
)
from chiffon_worker.metrics.gpu_types import GpuDevice, bytes_to_gib
from chiffon_worker.metrics.sysfs import read_int, read_text

log = logging.getLogger(__name__)

SOURCE = "intel-sysfs"
INTEL_VENDOR_ID = "0x8086"
_XE_VRAM_GLOBS = ("tile*/physical_vram_size_bytes", "tile*/vram*/physical_vram_size_bytes")
DRIVERS = ("i915", "xe")
#: fdinfo regions of device-local memory (i915 ``local0``, xe ``vram0``), and of the
#: system memory an integrated GPU uses instead (i915 ``system0`` / ``stolen-system0``,
#: xe ``system`` / ``gtt`` / ``stolen``).
LOCAL_REGIONS = ("local", "vram")
SYSTEM_REGIONS = ("system", "gtt", "stolen")


def _vram_bytes(dev: Path) -> int | None:
    """Total VRAM in bytes where the driver exposes it, else ``None``."""
    total = read_int(dev / "mem_info_vram_total")
    if total is not None:
        return total
    sizes = [read_int(path) for pattern in _XE_VRAM_GLOBS for path in sorted(dev.glob(pattern))]
    known = [s for s in sizes if s is not None]
    return sum(known) if known else None


def power_limit_w(dev: Path) -> float | None:
    """The enforced sustained power limit (W) from hwmon ``power1_max``; ``None`` when
    absent or 0 (disabled)."""
    watts = hwmon_watts(dev, ("power1_max",))
    return watts if watts else None


def process_memory(memory: Mapping[str, int]) -> int | None:
    """A process's memory on an Intel GPU (bytes): its device-local regions, or, when it
    reports none (an integrated GPU has none), its system-memory regions."""
    local = region_bytes(memory, LOCAL_REGIONS)
    return local if local is not None else region_bytes(memory, SYSTEM_REGIONS)


class IntelSysfsSource:
    """Intel GPUs under ``<sysfs_root>/class/drm`` (presence, name, VRAM if exposed, temp,
    power limit, processes). ``proc_root``: where procfs is mounted; ``clients``
    replaces the default scanner of it."""

    name = SOURCE

    def __init__(self, sysfs_root: str = "/sys", proc_root: str = "/proc",
                 clients: DrmClientScanner | None = None) -> None:
        self.sysfs_root = sysfs_root
        self.clients = clients if clients is not None else DrmClientScanner(proc_root)

    def _card(self, card: Path, scan: DrmScan) -> GpuDevice:
        dev = card / "device"
        device_id = read_text(dev / "device") or "?"
        vram = _vram_bytes(dev)
        busy = read_int(dev / "gpu_busy_percent")
        cap, cap_errors = optional_reading("power_limit_w", lambda: power_limit_w(dev))
        processes, process_errors = card_processes(scan, card, DRIVERS, process_memory)
        return GpuDevice(
            index=card_number(card),
            vendor="intel",
            name=f"Intel GPU {device_id}",
            vram_total_gb=None if vram is None else bytes_to_gib(vram),
            vram_available_gb=None,
            utilization_percent=None if busy is None else float(busy),
            temperature_c=hwmon_temperature(dev, ("temp2_input", "temp1_input")),
            source=SOURCE,
            power_limit_w=cap,
            processes=processes,
            field_errors=cap_errors + process_errors,
        )

    def read(self, timeout_s: float = 0.0) -> tuple[GpuDevice, ...]:
        """Every Intel card (GiB, degC, W). A card that cannot be read carries ``error``.

        ``timeout_s`` is accepted for the common source interface (sysfs reads are not
        subprocesses; the process scan has its own small budget, see
        :class:`~.drm_clients.DrmClientScanner`). Raises ``GpuSourceUnavailable`` when
        there is no Intel card.
        """
        del timeout_s
        cards = drm_cards(self.sysfs_root, INTEL_VENDOR_ID)
        if not cards:
            raise GpuSourceUnavailable("no Intel GPU in sysfs")
        scan = self.clients.scan()
        devices: list[GpuDevice] = []
        for card in cards:
            try:
                devices.append(self._card(card, scan))
            except (OSError, ValueError) as exc:
                log.debug("Intel %s: %s", card, exc)
                devices.append(GpuDevice.failed(card_number(card), "intel", "Intel GPU", SOURCE,
                                                f"{card.name}: {exc}"))
        return tuple(devices)
