"""AMD GPUs from amdgpu's sysfs (and ``rocm-smi`` where sysfs lacks memory figures).

For each ``<sysfs_root>/class/drm/card<N>`` whose ``device/vendor`` is ``0x1002``:
``mem_info_vram_total`` / ``mem_info_vram_used`` (bytes), ``gpu_busy_percent`` (%),
``hwmon/hwmon*/temp1_input`` (millidegrees C). The GTT (system memory the GPU maps) goes
in ``extra`` as ``gtt_total_gb`` / ``gtt_used_gb``. Device index = the DRM card number
``N``. Units out: GiB, degC, %, W.

* **APU** (``unified=True``): decided by :func:`is_apu` (KFD topology, then the hwmon
  ``in1_input`` only APUs have), never by VRAM size. An APU's VRAM figures stay the
  BIOS carve-out; combining carve-out, GTT and host memory is
  :mod:`.gpu_snapshot`'s job.
* **Power**: hwmon ``power1_average`` (else ``power1_input``) as the draw and
  ``power1_cap`` as the limit, microwatts in sysfs.
* **ECC**: ``device/ras/umc_err_count`` (``ue: N`` / ``ce: N`` lines, newer kernels
  add ``de: N``): ``ue`` is ``ecc_uncorrected_volatile``; no file (consumer cards,
  RAS off) is ``None``.
* **Processes**: DRM fdinfo (:mod:`.drm_clients`): VRAM per process, plus GTT on an APU.

Optional readings (power, ECC, processes) that fail are ``None`` with the reason in
``field_errors``; they never fail the card.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from chiffon_worker.errors import GpuProbeError, GpuSourceUnavailable
from chiffon_worker.metrics.bounded_subprocess import CompletedCommand, run_bounded
from chiffon_worker.metrics.drm import (
    CARD_RE,
    card_number,
    drm_cards,
    hwmon_has,
    hwmon_temperature,
    hwmon_watts,
    optional_reading,
    pci_address,
    pci_location_id,
    render_minor,
)
from chiffon_worker.metrics.drm_clients import (
    DrmClientScanner,
    DrmScan,
    MemoryRule,
    card_processes,
    region_bytes,
)
from chiffon_worker.metrics.gpu_types import GpuDevice, bytes_to_gib
from chiffon_worker.metrics.sysfs import read_int, read_text

log = logging.getLogger(__name__)

SOURCE = "amd-sysfs"
ROCM_SOURCE = "rocm-smi"
AMD_VENDOR_ID = "0x1002"
ROCM_SMI_ARGS = ("rocm-smi", "--showmeminfo", "vram", "--json")
DRIVERS = ("amdgpu",)
KFD_NODES = ("class", "kfd", "kfd", "topology", "nodes")
#: ``location_id`` bits compared: bus (15..8) and device (7..3). The function bits are
#: left out: on partitioned GPUs (GC 9.4.3) some kernels OR the partition's node id
#: into them (later ones into bits 31..28, which the mask drops as well), and an amdgpu
#: GPU is PCI function 0 anyway.
LOCATION_MASK = 0xFFF8

Runner = Callable[[Sequence[str], float], CompletedCommand]


@dataclass(frozen=True)
class KfdNode:
    """One ``<sysfs_root>/class/kfd/kfd/topology/nodes/<N>/properties`` of the KFD
    (ROCm's kernel driver): core counts, and where the GPU is (``None``: not printed)."""

    cpu_cores_count: int
    simd_count: int
    domain: int | None = None
    location_id: int | None = None
    drm_render_minor: int | None = None

    @property
    def is_apu(self) -> bool:
        """ROCm's rule (libhsakmt: a node with ``NumCPUCores && NumFComputeCores`` is
        not a dGPU): CPU cores and SIMDs in one node."""
        return self.cpu_cores_count > 0 and self.simd_count > 0

    def matches(self, location: tuple[int, int] | None, minor: int | None) -> bool:
        """Whether this GPU node is the card at PCI ``location`` (``(domain,
        location_id)``, see :func:`~.drm.pci_location_id`), or, where either side lacks
        a location, the card with render node ``minor``. The location decides when
        known: a partitioned GPU's nodes carry the render minors of its partitions."""
        if self.simd_count <= 0:
            return False  # a CPU-only node
        if location is not None and self.location_id is not None:
            domain, location_id = location
            return ((self.domain is None or self.domain == domain)
                    and self.location_id & LOCATION_MASK == location_id & LOCATION_MASK)
        return minor is not None and self.drm_render_minor == minor


def parse_kfd_properties(text: str) -> KfdNode:
    """A KFD node's ``properties`` text (``name value`` lines, decimal) to a
    :class:`KfdNode`; ``ValueError`` without the core counts."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.strip().partition(" ")
        if value.strip().isdigit():
            values[name] = int(value)
    try:
        return KfdNode(cpu_cores_count=values["cpu_cores_count"],
                       simd_count=values["simd_count"], domain=values.get("domain"),
                       location_id=values.get("location_id"),
                       drm_render_minor=values.get("drm_render_minor"))
    except KeyError as exc:
        raise ValueError(f"KFD node properties lack {exc}") from exc


def kfd_nodes(sysfs_root: str) -> tuple[KfdNode, ...] | None:
    """The KFD topology's nodes; ``None`` without a KFD topology (amdgpu without KFD,
    older kernels, a container without it). Unreadable nodes are left out."""
    base = Path(sysfs_root).joinpath(*KFD_NODES)
    try:
        dirs = sorted(base.iterdir())
    except OSError:
        return None
    nodes: list[KfdNode] = []
    for directory in dirs:
        try:
            text = read_text(directory / "properties")
            if text is not None:
                nodes.append(parse_kfd_properties(text))
        except (OSError, ValueError) as exc:
            log.debug("KFD node %s: %s", directory, exc)
    return tuple(nodes)


def is_apu(card: Path, nodes: tuple[KfdNode, ...] | None) -> bool:
    """Whether ``card`` is an APU (shares system memory), never judged by VRAM size.

    1. The KFD topology node of this card (matched by PCI location, else by render
       minor: :meth:`KfdNode.matches`) holds both CPU cores and SIMDs: ROCm's APU
       rule. Kernels that build the topology from the BIOS's CRAT table show an APU
       that way.
    2. Otherwise the card's hwmon has ``in1_input`` (vddnb, the northbridge voltage):
       amdgpu shows it on APUs only (``amdgpu_pm.c``: "only APUs have vddnb"). This
       is needed beyond a missing KFD too: since the kernel ignores CRAT (6.6, with
       IOMMUv2 gone) an APU's GPU gets a node of its own without CPU cores, which the
       KFD rule alone would call discrete.
    3. Otherwise discrete. Known miss: MI300A (GC 9.4.3) hides vddnb, so on a kernel
       that ignores CRAT it is reported as discrete.
    """
    if nodes:
        address = pci_address(card)
        location = None if address is None else pci_location_id(address)
        minor = render_minor(card)
        if any(node.is_apu for node in nodes if node.matches(location, minor)):
            return True
    return hwmon_has(card / "device", "in1_input")


def ras_uncorrected(dev: Path) -> int | None:
    """Uncorrected ECC errors since the driver loaded, from ``ras/umc_err_count``
    (``ue: N`` line); ``None`` without the file. ``ValueError`` when it holds no ``ue``
    count (``Query currently inaccessible`` during a RAS recovery)."""
    text = read_text(dev / "ras" / "umc_err_count")
    if text is None:
        return None
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == "ue":
            return int(value.strip())
    raise ValueError(f"no ue count in {text[:80]!r}")


def memory_rule(unified: bool) -> MemoryRule:
    """What counts as a process's memory on this GPU: VRAM, plus GTT on an APU."""
    prefixes = ("vram", "gtt") if unified else ("vram",)
    return lambda memory: region_bytes(memory, prefixes)


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
    :func:`~chiffon_worker.metrics.bounded_subprocess.run_bounded`). ``proc_root``: where
    procfs is mounted, for the GPU processes; ``clients`` replaces the default scanner
    of it (e.g. one shared with the Intel source).
    """

    name = SOURCE

    def __init__(self, sysfs_root: str = "/sys", run: Runner = run_bounded,
                 proc_root: str = "/proc", clients: DrmClientScanner | None = None) -> None:
        self.sysfs_root = sysfs_root
        self._run = run
        self.clients = clients if clients is not None else DrmClientScanner(proc_root)

    def _rocm_vram(self, timeout_s: float) -> dict[int, tuple[int, int]]:
        done = self._run(ROCM_SMI_ARGS, timeout_s)
        if done.returncode != 0:
            message = (done.stderr or done.stdout).strip().splitlines()
            raise GpuProbeError(f"rocm-smi: exit {done.returncode}"
                                + (f": {message[0][:200]}" if message else ""))
        return parse_rocm_smi_vram(done.stdout)

    def _card(self, card: Path, nodes: tuple[KfdNode, ...] | None, scan: DrmScan
              ) -> tuple[GpuDevice, bool]:
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
        unified = is_apu(card, nodes)
        draw, draw_errors = optional_reading(
            "power_draw_w", lambda: hwmon_watts(dev, ("power1_average", "power1_input")))
        cap, cap_errors = optional_reading("power_limit_w",
                                           lambda: hwmon_watts(dev, ("power1_cap",)))
        ecc, ecc_errors = optional_reading("ecc_uncorrected_volatile",
                                           lambda: ras_uncorrected(dev))
        processes, process_errors = card_processes(scan, card, DRIVERS, memory_rule(unified))
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
            unified=unified,
            power_draw_w=draw,
            power_limit_w=cap,
            ecc_uncorrected_volatile=ecc,
            processes=processes,
            field_errors=draw_errors + cap_errors + ecc_errors + process_errors,
        )
        return device, total is None or used is None

    def read(self, timeout_s: float) -> tuple[GpuDevice, ...]:
        """Every AMD card (GiB, degC, %, W). A card that cannot be read carries ``error``.

        Raises :class:`~chiffon_worker.errors.GpuSourceUnavailable` when there is none.
        ``rocm-smi`` (only run when sysfs lacks memory figures) waits at most
        ``timeout_s`` seconds; the process scan has its own small budget (see
        :class:`~.drm_clients.DrmClientScanner`) and is reused for a few seconds.
        """
        cards = drm_cards(self.sysfs_root, AMD_VENDOR_ID)
        if not cards:
            raise GpuSourceUnavailable("no AMD GPU in sysfs")
        nodes = kfd_nodes(self.sysfs_root)
        scan = self.clients.scan()
        devices: list[GpuDevice] = []
        lacking: list[int] = []
        for card in cards:
            try:
                device, missing_memory = self._card(card, nodes, scan)
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
