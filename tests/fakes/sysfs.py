"""Fake sysfs trees under ``tmp_path``, laid out like the kernel's, with ground truth.

A GPU is a PCI device directory ``bus/pci/devices/<address>/`` (``vendor``, ``device``,
``class``, driver attributes, ``hwmon/hwmon<N>/``, ``power/runtime_status``) and, for DRM
drivers, ``class/drm/card<N>/device`` -> that directory, as on a real machine. Display
connectors (``card0-DP-1``) are written too, with a ``device`` link to the same PCI
directory so that a reader which forgot to skip them would count the card twice.

The card definitions below are the ground truth tests compute expectations from; values
are those of gpu-samples.md (raw units: bytes, percent, millidegrees C).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Card:
    """One GPU as sysfs shows it. ``attrs`` go in the PCI device directory (raw values);
    ``hwmon`` in ``hwmon/hwmon0/``; ``files`` are extra relative paths (e.g. xe tiles)."""

    number: int | None  # DRM card number; None: no DRM entry (NVIDIA without nvidia-drm)
    pci_address: str
    vendor: str
    device: str
    pci_class: str = "0x030000"
    attrs: dict[str, int | str] = field(default_factory=dict)
    hwmon: dict[str, int] = field(default_factory=dict)
    files: dict[str, int | str] = field(default_factory=dict)
    connectors: tuple[str, ...] = ()
    runtime_status: str = "active"


# gpu-samples.md, "APU card0" (device id not in the sample: 0x15bf is a Phoenix APU).
AMD_APU_CARD0 = Card(
    number=0, pci_address="0000:c4:00.0", vendor="0x1002", device="0x15bf",
    attrs={"mem_info_vram_total": 2147483648, "mem_info_vram_used": 79949824,
           "mem_info_gtt_total": 17179869184, "gpu_busy_percent": 10},
    hwmon={"temp1_input": 24000, "in1_input": 0},
    connectors=("eDP-1", "DP-1"),
)
# gpu-samples.md, "Discrete card1".
AMD_DGPU_CARD1 = Card(
    number=1, pci_address="0000:03:00.0", vendor="0x1002", device="0x744c",
    attrs={"mem_info_vram_total": 25753026560, "mem_info_vram_used": 1073741824,
           "gpu_busy_percent": 4},
    hwmon={"temp1_input": 45000},
    connectors=("DP-1", "HDMI-A-1"),
)
# gpu-samples.md, Intel: "xe discrete card0 device 0xe20b, temp2_input 41000".
INTEL_XE_CARD0 = Card(
    number=0, pci_address="0000:07:00.0", vendor="0x8086", device="0xe20b",
    hwmon={"temp2_input": 41000}, connectors=("DP-1",),
)
# gpu-samples.md, Intel: "i915 integrated device 0x46a6" (no hwmon on an iGPU).
INTEL_I915_CARD1 = Card(
    number=1, pci_address="0000:00:02.0", vendor="0x8086", device="0x46a6",
    connectors=("eDP-1",),
)


def nvidia_card(pci_address: str, device: str = "0x2684", runtime_status: str = "active",
                number: int | None = None) -> Card:
    """An NVIDIA GPU's PCI entry (0x2684 = RTX 4090); DRM entry only with ``number``."""
    return Card(number=number, pci_address=pci_address, vendor="0x10de", device=device,
                runtime_status=runtime_status)


def _write(path: Path, value: int | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")


def write_card(root: Path, card: Card) -> Path:
    """Write ``card`` under the sysfs root ``root``; returns its PCI device directory."""
    pci = root / "bus" / "pci" / "devices" / card.pci_address
    if pci.exists():
        raise ValueError(f"two cards at PCI address {card.pci_address}")
    pci.mkdir(parents=True)
    _write(pci / "vendor", card.vendor)
    _write(pci / "device", card.device)
    _write(pci / "class", card.pci_class)
    _write(pci / "power" / "runtime_status", card.runtime_status)
    for name, value in card.attrs.items():
        _write(pci / name, value)
    for name, value in card.hwmon.items():
        _write(pci / "hwmon" / "hwmon0" / name, value)
    for rel, value in card.files.items():
        _write(pci / rel, value)
    if card.number is not None:
        drm = root / "class" / "drm"
        entry = drm / f"card{card.number}"
        if entry.exists():
            raise ValueError(f"two cards numbered {card.number}")
        entry.mkdir(parents=True)
        (entry / "device").symlink_to(os.path.relpath(pci, entry))
        for connector in card.connectors:
            conn = drm / f"card{card.number}-{connector}"
            conn.mkdir()
            (conn / "device").symlink_to(os.path.relpath(pci, conn))
            _write(conn / "status", "disconnected")
    return pci


def write_tree(root: Path, *cards: Card) -> Path:
    """A sysfs root with ``cards`` (and the usual non-card DRM entries); returns ``root``."""
    drm = root / "class" / "drm"
    drm.mkdir(parents=True, exist_ok=True)
    (drm / "renderD128").mkdir(exist_ok=True)
    _write(drm / "version", "drm 1.1.0 20060810")
    (root / "bus" / "pci" / "devices").mkdir(parents=True, exist_ok=True)
    for card in cards:
        write_card(root, card)
    return root


def renumbered(card: Card, number: int, pci_address: str) -> Card:
    """The same GPU as another DRM card number (e.g. card10) at another PCI address."""
    return Card(number=number, pci_address=pci_address, vendor=card.vendor, device=card.device,
                pci_class=card.pci_class, attrs=dict(card.attrs), hwmon=dict(card.hwmon),
                files=dict(card.files), connectors=card.connectors,
                runtime_status=card.runtime_status)
