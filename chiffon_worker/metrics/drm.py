"""DRM card enumeration shared by the GPU sources.

Cards are ``<sysfs_root>/class/drm/card<N>`` (N may be 10 or more); connector entries such
as ``card0-DP-1`` are skipped. Units: temperatures in degrees C.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from chiffon_worker.metrics.sysfs import read_int, read_text

CARD_RE = re.compile(r"^card(\d+)$")


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
    hwmon = device_dir / "hwmon"
    try:
        dirs = sorted(hwmon.glob("hwmon*"))
    except OSError:
        return None
    for name in names:
        for directory in dirs:
            value = read_int(directory / name)
            if value is not None:
                return round(value / 1000.0, 1)
    return None
