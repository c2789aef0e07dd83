"""DRM card enumeration and hwmon readings shared by the AMD and Intel sources.

Cards are ``<sysfs_root>/class/drm/card<N>`` (N may be 10 or more); connector entries such
as ``card0-DP-1`` are skipped. Units: temperatures in degrees C, power in watts (sysfs
gives millidegrees and microwatts).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from chiffon_worker.metrics.sysfs import read_int, read_text

CARD_RE = re.compile(r"^card(\d+)$")
RENDER_RE = re.compile(r"^renderD(\d+)$")
#: A PCI address as the kernel names its device directory: ``dddd:bb:dd.f`` (hex).
PCI_ADDRESS_RE = re.compile(
    r"^(?P<domain>[0-9a-f]{4,8}):(?P<bus>[0-9a-f]{2}):(?P<device>[0-1][0-9a-f])\.(?P<function>[0-7])$")
MICRO = 1_000_000

T = TypeVar("T")


def drm_cards(sysfs_root: str, vendor: str) -> list[Path]:
    """``<sysfs_root>/class/drm/card<N>`` of one PCI vendor (``"0x1002"``), ordered by N.

    Connector entries (``card0-DP-1``) and render nodes are skipped; a card whose vendor
    file cannot be read is skipped too.
    """
    base = Path(sysfs_root) / "class" / "drm"
    try:
        entries = list(base.iterdir())
    except OSError:
        return []
    cards: list[tuple[int, Path]] = []
    for entry in entries:
        match = CARD_RE.match(entry.name)
        if not match:
            continue
        try:
            found = read_text(entry / "device" / "vendor")
        except OSError:
            continue
        if found is not None and found.lower() == vendor:
            cards.append((int(match.group(1)), entry))
    return [path for _, path in sorted(cards)]


def card_number(card: Path) -> int:
    """``N`` of ``.../card<N>``."""
    match = CARD_RE.match(card.name)
    if match is None:
        raise ValueError(f"not a DRM card: {card}")
    return int(match.group(1))


def hwmon_temperature(device_dir: Path, names: Sequence[str] = ("temp1_input",)) -> float | None:
    """The first of ``names`` found under ``device/hwmon/hwmon*/``, in degrees C
    (sysfs gives millidegrees)."""
    value = hwmon_value(device_dir, names)
    return None if value is None else round(value / 1000.0, 1)


def hwmon_value(device_dir: Path, names: Sequence[str]) -> int | None:
    """The raw integer of the first of ``names`` found under ``device/hwmon/hwmon*/``
    (units as sysfs gives them); ``None`` if none is there. Read errors propagate."""
    try:
        dirs = sorted((device_dir / "hwmon").glob("hwmon*"))
    except OSError:
        return None
    for name in names:
        for directory in dirs:
            value = read_int(directory / name)
            if value is not None:
                return value
    return None


def hwmon_has(device_dir: Path, name: str) -> bool:
    """Whether some ``device/hwmon/hwmon*/<name>`` exists (the driver chose to show it)."""
    try:
        return any((directory / name).exists()
                   for directory in (device_dir / "hwmon").glob("hwmon*"))
    except OSError:
        return False


def hwmon_watts(device_dir: Path, names: Sequence[str]) -> float | None:
    """The first of ``names`` (microwatts in sysfs) in watts, 1 decimal; ``None`` if absent."""
    value = hwmon_value(device_dir, names)
    return None if value is None else round(value / MICRO, 1)


def pci_address(card: Path) -> str | None:
    """The PCI address (``0000:03:00.0``, lower case) of ``card``: the name of the directory
    its ``device`` link resolves to; ``None`` when that is not a PCI device (a platform
    GPU) or cannot be resolved."""
    try:
        name = Path(os.path.realpath(card / "device")).name.lower()
    except OSError:
        return None
    return name if PCI_ADDRESS_RE.match(name) else None


def pci_location_id(address: str) -> tuple[int, int] | None:
    """``(domain, bus << 8 | device << 3 | function)`` of a PCI address: the pair the KFD
    topology reports as ``domain`` / ``location_id`` (the kernel's ``pci_domain_nr`` and
    ``pci_dev_id``, i.e. ``PCI_DEVID(bus, devfn)`` with ``devfn = device << 3 |
    function``). ``None`` for a string that is not a PCI address."""
    match = PCI_ADDRESS_RE.match(address.lower())
    if match is None:
        return None
    devfn = (int(match["device"], 16) << 3) | int(match["function"])
    return int(match["domain"], 16), (int(match["bus"], 16) << 8) | devfn


def render_minor(card: Path) -> int | None:
    """The DRM render-node minor of ``card`` (``128`` for ``device/drm/renderD128``);
    ``None`` when the device has no render node."""
    try:
        entries = list((card / "device" / "drm").iterdir())
    except OSError:
        return None
    for entry in entries:
        match = RENDER_RE.match(entry.name)
        if match:
            return int(match.group(1))
    return None


def error_text(exc: OSError | ValueError) -> str:
    """A short reason for a failed read: the OS error's text without the path
    (``"Input/output error"``), or a parse error's message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def optional_reading(field_name: str, read: Callable[[], T]) -> tuple[T | None, tuple[str, ...]]:
    """Run one optional read: ``(value, ())``, or ``(None, ("<field_name>: <reason>",))``
    when it fails with ``OSError`` (EIO from a wedged device) or ``ValueError`` (text
    that is not a number). Used for readings that must not fail the whole card."""
    try:
        return read(), ()
    except (OSError, ValueError) as exc:
        return None, (f"{field_name}: {error_text(exc)}",)
