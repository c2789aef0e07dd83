"""Fake sysfs trees under ``tmp_path``, laid out like the kernel's, with ground truth.

A GPU is a PCI device directory ``bus/pci/devices/<address>/`` (``vendor``, ``device``,
``class``, driver attributes, ``hwmon/hwmon<N>/``, ``power/runtime_status``) and, for DRM
drivers, ``class/drm/card<N>/device`` -> that directory, as on a real machine, with the
device's ``drm/card<N>`` and ``drm/renderD<minor>`` entries. Display connectors
(``card0-DP-1``) are written too, with a ``device`` link to the same PCI directory so
that a reader which forgot to skip them would count the card twice.

Cards with a ``kfd`` node also get ``class/kfd/kfd/topology/nodes/<i>/properties``
(``name value`` lines, as amdkfd prints them), preceded by a CPU-only node 0 unless an
APU's node already holds the CPU cores (the layout of kernels that use the BIOS's CRAT
table).

The card definitions below are the ground truth tests compute expectations from; values
are those of gpu-samples.md where it has them (raw units: bytes, percent, millidegrees
C, microwatts); the rest (power, KFD nodes, RAS, the extra cards) are typical values,
marked as such.
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
    kfd: dict[str, int] = field(default_factory=dict)  # its KFD node's properties; {}: none

    @property
    def render_minor(self) -> int | None:
        """The render node minor the kernel gives card N here (``renderD<128+N>``)."""
        return None if self.number is None else 128 + self.number


#: The CPU-only KFD node a kernel that ignores CRAT (6.6 on) lists first.
KFD_CPU_NODE: dict[str, int] = {
    "cpu_cores_count": 16, "simd_count": 0, "mem_banks_count": 1, "caches_count": 0,
    "vendor_id": 0, "device_id": 0, "location_id": 0, "domain": 0, "drm_render_minor": 0,
}


# gpu-samples.md, "APU card0" (device id not in the sample: 0x15bf is a Phoenix APU).
# Typical: power1_input (no power1_average), and the KFD node of a CRAT-based topology:
# CPU cores and SIMDs in one node; location_id 50176 = 0xc400 = bus 0xc4, device 0, fn 0.
AMD_APU_CARD0 = Card(
    number=0, pci_address="0000:c4:00.0", vendor="0x1002", device="0x15bf",
    attrs={"mem_info_vram_total": 2147483648, "mem_info_vram_used": 79949824,
           "mem_info_gtt_total": 17179869184, "gpu_busy_percent": 10},
    hwmon={"temp1_input": 24000, "in1_input": 0, "power1_input": 7123000},
    connectors=("eDP-1", "DP-1"),
    kfd={"cpu_cores_count": 16, "simd_count": 24, "mem_banks_count": 1,
         "vendor_id": 4098, "device_id": 5567, "location_id": 50176, "domain": 0,
         "drm_render_minor": 128},
)
# gpu-samples.md, "Discrete card1" (0x744c: RX 7900 XTX). Typical: power draw and cap,
# no RAS (consumer card), KFD node without CPU cores; location_id 768 = 0x0300.
AMD_DGPU_CARD1 = Card(
    number=1, pci_address="0000:03:00.0", vendor="0x1002", device="0x744c",
    attrs={"mem_info_vram_total": 25753026560, "mem_info_vram_used": 1073741824,
           "gpu_busy_percent": 4},
    hwmon={"temp1_input": 45000, "power1_average": 38456000, "power1_cap": 327000000},
    connectors=("DP-1", "HDMI-A-1"),
    kfd={"cpu_cores_count": 0, "simd_count": 192, "mem_banks_count": 1,
         "vendor_id": 4098, "device_id": 29772, "location_id": 768, "domain": 0,
         "drm_render_minor": 129},
)
# Typical: a small discrete card (0x73ff: RX 6600, 8 GiB) whose GTT (3/4 of a 64 GiB
# host) dwarfs its VRAM. It must not be taken for an APU.
AMD_SMALL_DGPU_CARD2 = Card(
    number=2, pci_address="0000:0b:00.0", vendor="0x1002", device="0x73ff",
    attrs={"mem_info_vram_total": 8573157376, "mem_info_vram_used": 268435456,
           "mem_info_gtt_total": 51539607552, "mem_info_gtt_used": 20971520,
           "gpu_busy_percent": 0},
    hwmon={"temp1_input": 38000, "power1_average": 9000000, "power1_cap": 100000000},
    kfd={"cpu_cores_count": 0, "simd_count": 56, "mem_banks_count": 1,
         "vendor_id": 4098, "device_id": 29695, "location_id": 2816, "domain": 0,
         "drm_render_minor": 130},
)
# Typical: an Instinct MI210 (0x740f, 64 GiB HBM2e) with RAS on: the kernel's
# umc_err_count format of newer kernels (ue, ce, de lines). No edge temperature.
AMD_MI210_CARD3 = Card(
    number=3, pci_address="0000:83:00.0", vendor="0x1002", device="0x740f",
    attrs={"mem_info_vram_total": 68702699520, "mem_info_vram_used": 10485760,
           "gpu_busy_percent": 0},
    hwmon={"temp2_input": 36000, "power1_average": 42000000, "power1_cap": 300000000},
    files={"ras/umc_err_count": "ue: 2\nce: 17\nde: 0"},
    kfd={"cpu_cores_count": 0, "simd_count": 416, "mem_banks_count": 1,
         "vendor_id": 4098, "device_id": 29711, "location_id": 33536, "domain": 0,
         "drm_render_minor": 131},
)
# gpu-samples.md, Intel: "xe discrete card0 device 0xe20b, temp2_input 41000".
# Typical: power1_max 190 W (the B580's board power) and an energy counter.
INTEL_XE_CARD0 = Card(
    number=0, pci_address="0000:07:00.0", vendor="0x8086", device="0xe20b",
    hwmon={"temp2_input": 41000, "power1_max": 190000000, "energy1_input": 123456789},
    connectors=("DP-1",),
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
        (pci / "drm" / f"card{card.number}").mkdir(parents=True)
        (pci / "drm" / f"renderD{card.render_minor}").mkdir()
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
    write_kfd(root, *(card.kfd for card in cards if card.kfd))
    return root


def write_kfd(root: Path, *gpu_nodes: dict[str, int]) -> None:
    """A KFD topology with ``gpu_nodes`` (none: no topology, as without amdkfd). A
    CPU-only node comes first unless some node already holds CPU cores."""
    if not gpu_nodes:
        return
    nodes = list(gpu_nodes)
    if not any(node.get("cpu_cores_count", 0) > 0 for node in nodes):
        nodes.insert(0, KFD_CPU_NODE)
    base = root / "class" / "kfd" / "kfd" / "topology" / "nodes"
    for number, properties in enumerate(nodes):
        text = "".join(f"{name} {value}\n" for name, value in properties.items())
        _write(base / str(number) / "properties", text.rstrip("\n"))


def renumbered(card: Card, number: int, pci_address: str) -> Card:
    """The same GPU as another DRM card number (e.g. card10) at another PCI address."""
    return Card(number=number, pci_address=pci_address, vendor=card.vendor, device=card.device,
                pci_class=card.pci_class, attrs=dict(card.attrs), hwmon=dict(card.hwmon),
                files=dict(card.files), connectors=card.connectors,
                runtime_status=card.runtime_status)  # no KFD node: its location would be stale
