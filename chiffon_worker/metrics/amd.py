"""AMD GPUs from amdgpu's sysfs (and ``rocm-smi`` where sysfs lacks memory figures).

For each ``<sysfs_root>/class/drm/card<N>`` whose ``device/vendor`` is ``0x1002``:
``mem_info_vram_total`` / ``mem_info_vram_used`` (bytes), ``gpu_busy_percent`` (%),
``hwmon/hwmon*/temp1_input`` (millidegrees C). An APU reports its small carve-out as
VRAM; the GTT (system memory the GPU maps) goes in ``extra`` as ``gtt_total_gb`` /
``gtt_used_gb``. Device index = the DRM card number ``N``. Units out: GiB, degC, %.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from chiffon_worker.errors import GpuProbeError, GpuSourceUnavailable
from chiffon_worker.metrics.bounded_subprocess import CompletedCommand, run_bounded
from chiffon_worker.metrics.drm import (
    CARD_RE,
    card_number,
    drm_cards,
    hwmon_temperature,
)
from chiffon_worker.metrics.gpu_types import GpuDevice, bytes_to_gib
from chiffon_worker.metrics.sysfs import read_int, read_text

log = logging.getLogger(__name__)

SOURCE = "amd-sysfs"
ROCM_SOURCE = "rocm-smi"
AMD_VENDOR_ID = "0x1002"
ROCM_SMI_ARGS = ("rocm-smi", "--showmeminfo", "vram", "--json")

Runner = Callable[[Sequence[str], float], CompletedCommand]


def parse_rocm_smi_vram(text: str) -> dict[int, tuple[int, int]]:
    """``rocm-smi --showmeminfo vram --json`` to ``{card N: (total bytes, used bytes)}``.

    Values arrive as strings. Raises :class:`~chiffon_worker.errors.GpuProbeError` on
    output that is not the expected JSON.
    """
    try:
        data: Any = json.loads(text)
    except ValueError as exc:
        raise GpuProbeError(f"rocm-smi: output is not JSON: {text[:120]!r}") from exc
    if not isinstance(data, dict):
        raise GpuProbeError(f"rocm-smi: expected a JSON object, got {type(data).__name__}")
    out: dict[int, tuple[int, int]] = {}
    for key, fields in data.items():
        match = CARD_RE.match(str(key))
        if not match or not isinstance(fields, dict):
            continue  # e.g. "system" entries
        try:
            total = int(str(fields["VRAM Total Memory (B)"]))
            used = int(str(fields["VRAM Total Used Memory (B)"]))
        except (KeyError, ValueError) as exc:
            raise GpuProbeError(f"rocm-smi: bad memory figures for {key}: {fields!r}") from exc
        out[int(match.group(1))] = (total, used)
    return out


class AmdSysfsSource:
    """AMD GPUs under ``<sysfs_root>/class/drm``; ``rocm-smi`` fills missing memory figures.

    ``run`` executes a command with a time bound (injectable; defaults to
    :func:`~chiffon_worker.metrics.bounded_subprocess.run_bounded`).
    """

    name = SOURCE

    def __init__(self, sysfs_root: str = "/sys", run: Runner = run_bounded) -> None:
        self.sysfs_root = sysfs_root
        self._run = run

    def _rocm_vram(self, timeout_s: float) -> dict[int, tuple[int, int]]:
        done = self._run(ROCM_SMI_ARGS, timeout_s)
        if done.returncode != 0:
            message = (done.stderr or done.stdout).strip().splitlines()
            raise GpuProbeError(f"rocm-smi: exit {done.returncode}"
                                + (f": {message[0][:200]}" if message else ""))
        return parse_rocm_smi_vram(done.stdout)

    def _card(self, card: Path) -> tuple[GpuDevice, bool]:
        """One card's device, and whether its VRAM figures are missing from sysfs."""
        dev = card / "device"
        device_id = read_text(dev / "device") or "?"
        name = read_text(dev / "product_name") or f"AMD GPU {device_id}"
        total = read_int(dev / "mem_info_vram_total")
        used = read_int(dev / "mem_info_vram_used")
        busy = read_int(dev / "gpu_busy_percent")
        extra: dict[str, Any] = {}
        gtt_total = read_int(dev / "mem_info_gtt_total")
        gtt_used = read_int(dev / "mem_info_gtt_used")
        if gtt_total is not None:
            extra["gtt_total_gb"] = bytes_to_gib(gtt_total)
        if gtt_used is not None:
            extra["gtt_used_gb"] = bytes_to_gib(gtt_used)
        device = GpuDevice(
            index=card_number(card),
            vendor="amd",
            name=name,
            vram_total_gb=None if total is None else bytes_to_gib(total),
            vram_available_gb=None if total is None or used is None
            else bytes_to_gib(max(0, total - used)),
            utilization_percent=None if busy is None else float(busy),
            temperature_c=hwmon_temperature(dev),
            source=SOURCE,
            extra=extra,
        )
        return device, total is None or used is None

    def read(self, timeout_s: float) -> tuple[GpuDevice, ...]:
        """Every AMD card (GiB, degC, %). A card that cannot be read carries ``error``.

        Raises :class:`~chiffon_worker.errors.GpuSourceUnavailable` when there is none.
        ``rocm-smi`` (only run when sysfs lacks memory figures) waits at most
        ``timeout_s`` seconds.
        """
        cards = drm_cards(self.sysfs_root, AMD_VENDOR_ID)
        if not cards:
            raise GpuSourceUnavailable("no AMD GPU in sysfs")
        devices: list[GpuDevice] = []
        lacking: list[int] = []
        for card in cards:
            try:
                device, missing_memory = self._card(card)
            except (OSError, ValueError) as exc:
                log.debug("AMD %s: %s", card, exc)
                devices.append(GpuDevice.failed(card_number(card), "amd", "AMD GPU", SOURCE,
                                                f"{card.name}: {exc}"))
                continue
            if missing_memory:
                lacking.append(len(devices))
            devices.append(device)
        if lacking:
            self._fill_from_rocm_smi(devices, lacking, timeout_s)
        return tuple(devices)

    def _fill_from_rocm_smi(self, devices: list[GpuDevice], lacking: list[int],
                            timeout_s: float) -> None:
        try:
            vram = self._rocm_vram(timeout_s)
        except GpuSourceUnavailable:
            return  # no rocm-smi: VRAM stays unknown
        except GpuProbeError as exc:
            for pos in lacking:
                devices[pos] = replace(devices[pos], error=str(exc))
            return
        for pos in lacking:
            found = vram.get(devices[pos].index)
            if found is None:
                continue
            total, used = found
            devices[pos] = replace(devices[pos], vram_total_gb=bytes_to_gib(total),
                                    vram_available_gb=bytes_to_gib(max(0, total - used)),
                                    source=ROCM_SOURCE)
