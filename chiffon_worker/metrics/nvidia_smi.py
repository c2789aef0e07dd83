"""NVIDIA GPUs through the ``nvidia-smi`` command (the fallback when NVML cannot be loaded).

One read runs up to two bounded commands within the caller's ``timeout_s`` seconds:

1. the GPU query (:data:`QUERY_ARGS`): the six original fields, then the depth fields
   (UUID, power, throttle reasons, uncorrected ECC errors). A driver that rejects a field
   name (exit status 2) gets the six-field query (:data:`SHORT_QUERY_ARGS`) instead, now
   and for the life of the :class:`NvidiaSmiSource`;
2. the process query (:data:`APPS_QUERY_ARGS`), mapped to GPUs by UUID, with whatever
   time the first command left (none left, or the query fails: each device's
   ``processes`` stays unknown with a ``"processes: <reason>"`` field error). Without the
   depth fields there are no UUIDs, so the process query is not run.

A non-zero exit with GPU lines on stdout (one GPU lost, exit 15) reports those GPUs plus a
failed device for each GPU stderr names (``Unable to determine the device handle for
GPU<bus id>: <reason>``), numbered after the printed ones; with no GPU line it is a
:class:`~chiffon_worker.errors.GpuProbeError` naming the documented exit status.

Memory arrives in MiB and leaves as GiB; power is in watts. Parsing is pure
(:func:`parse_line`, :func:`parse_query_output`, :func:`parse_compute_apps`).

nvidia-smi prints NVML's error text in brackets in any field (``[Unknown Error]``,
``[GPU requires reset]``). Such a value is unknown (``None``) for that field only:
``[N/A]``, bare ``N/A`` and ``[Not Supported]`` just mean "not told"; any other text is a
fault recorded in the device's ``field_errors`` as ``"<snapshot field>: <text>"``;
``[GPU requires reset]`` and ``[GPU is lost]`` (:data:`FATAL_TEXTS`) make that one device
failed and ``unhealthy``. A line that cannot be parsed at all becomes a failed device if
its index is readable, and is otherwise skipped (logged); only output in which no line
parses is a :class:`~chiffon_worker.errors.GpuProbeError`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from chiffon_worker.errors import GpuProbeError, GpuSourceUnavailable, ProbeTimeout
from chiffon_worker.metrics.bounded_subprocess import CompletedCommand, run_bounded
from chiffon_worker.metrics.gpu_health import throttle_names
from chiffon_worker.metrics.gpu_types import GpuDevice, GpuProcess

log = logging.getLogger(__name__)

SOURCE = "nvidia-smi"
_FORMAT = "--format=csv,noheader,nounits"
#: The original query, understood by every driver; kept first and in this order.
SHORT_FIELDS = ("index", "name", "memory.total", "memory.free", "utilization.gpu",
                "temperature.gpu")
#: Depth fields appended to :data:`SHORT_FIELDS`. ``clocks_throttle_reasons.active`` is the
#: old name of ``clocks_event_reasons.active``, still accepted by new drivers.
DEPTH_FIELDS = ("uuid", "power.draw", "enforced.power.limit",
                "clocks_throttle_reasons.active", "ecc.errors.uncorrected.volatile.total")
QUERY_FIELDS = SHORT_FIELDS + DEPTH_FIELDS
QUERY_ARGS = ("nvidia-smi", "--query-gpu=" + ",".join(QUERY_FIELDS), _FORMAT)
SHORT_QUERY_ARGS = ("nvidia-smi", "--query-gpu=" + ",".join(SHORT_FIELDS), _FORMAT)
#: The process query; ``used_memory`` is MiB.
APPS_FIELDS = ("gpu_uuid", "pid", "process_name", "used_memory")
APPS_QUERY_ARGS = ("nvidia-smi", "--query-compute-apps=" + ",".join(APPS_FIELDS), _FORMAT)

#: Each queried field's name in the snapshot (used in ``field_errors``).
SNAPSHOT_NAMES = {
    "index": "index",
    "name": "name",
    "memory.total": "vram_total_gb",
    "memory.free": "vram_available_gb",
    "utilization.gpu": "utilization_percent",
    "temperature.gpu": "temperature_c",
    "uuid": "uuid",
    "power.draw": "power_draw_w",
    "enforced.power.limit": "power_limit_w",
    "clocks_throttle_reasons.active": "throttle_reasons",
    "ecc.errors.uncorrected.volatile.total": "ecc_uncorrected_volatile",
}
#: Placeholder texts (without brackets, case-insensitive) meaning "the platform does not
#: tell": unknown, but not a fault.
UNTOLD_TEXTS = frozenset({"n/a", "not supported"})
#: Placeholder texts (case-insensitive) meaning the whole GPU is unusable.
FATAL_TEXTS = frozenset({"gpu requires reset", "gpu is lost"})
#: Exit status of a query naming a field this driver does not know.
EXIT_INVALID_ARGUMENT = 2
#: Documented exit statuses of nvidia-smi and what they mean.
EXIT_MEANINGS = {
    EXIT_INVALID_ARGUMENT: "a supplied argument or field is not valid for this driver",
    3: "the requested operation is not available on this GPU",
    4: "permission denied (this user may not query the GPU)",
    6: "the query was unsuccessful",
    9: "NVIDIA driver is not loaded",
    12: "NVML shared library not found",
    14: "the GPU's infoROM is corrupted",
    15: "a GPU has fallen off the bus (GPU is lost)",
    18: "driver/library version mismatch",
    255: "unspecified error",
}
_MIB_PER_GIB = 1024.0
#: stderr line naming a GPU that could not be opened (exit 15 and kin).
_HANDLE_ERROR = re.compile(
    r"Unable to determine the device handle for GPU\s*"
    r"(?P<pci>[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7])\s*:\s*(?P<reason>.+)")

Clock = Callable[[], float]


def placeholder_text(value: str) -> str | None:
    """The text of a placeholder value (``"[GPU is lost]"`` -> ``"GPU is lost"``, bare
    ``"N/A"`` -> ``"N/A"``), or ``None`` when ``value`` is a real reading."""
    if len(value) >= 2 and value.startswith("[") and value.endswith("]"):
        return value[1:-1].strip()
    return "N/A" if value == "N/A" else None


def _is_untold(text: str) -> bool:
    return text.casefold() in UNTOLD_TEXTS


def _is_fatal(text: str) -> bool:
    return text.casefold() in FATAL_TEXTS


def _mib_to_gib(mib: float | None) -> float | None:
    return None if mib is None else round(mib / _MIB_PER_GIB, 3)


def _split(line: str, count: int, free_text_at: int) -> list[str]:
    """``line`` split on commas into ``count`` stripped fields. Extra commas are taken to
    belong to the free-text field at position ``free_text_at`` (a GPU or process name)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) > count:
        extra = len(parts) - count
        parts = [*parts[:free_text_at], ", ".join(parts[free_text_at:free_text_at + extra + 1]),
                 *parts[free_text_at + extra + 1:]]
    if len(parts) != count:
        raise GpuProbeError(
            f"nvidia-smi: expected {count} fields, got {len(parts)} in line {line.strip()!r}")
    return parts


@dataclass
class _LineReader:
    """The fields of one query line, read one at a time; collects what went wrong."""

    line: str
    values: dict[str, str]
    field_errors: list[str] = field(default_factory=list)
    fatal: str | None = None

    def placeholder(self, name: str) -> str | None:
        """The placeholder text of field ``name`` (noting faults), ``None`` if a reading.
        A field that was not queried counts as the untold ``"N/A"``."""
        value = self.values.get(name)
        if value is None:
            return "N/A"
        text = placeholder_text(value)
        if text is None or _is_untold(text):
            return text
        if _is_fatal(text):
            self.fatal = self.fatal or text
        else:
            self.field_errors.append(f"{SNAPSHOT_NAMES[name]}: {text}")
        return text

    def bad(self, name: str) -> GpuProbeError:
        """The error for field ``name`` holding something that is not a reading."""
        return GpuProbeError(
            f"nvidia-smi: bad {name} {self.values[name]!r} in line {self.line.strip()!r}")

    def number(self, name: str) -> float | None:
        """Field ``name`` as a float (its own unit), ``None`` when a placeholder."""
        if self.placeholder(name) is not None:
            return None
        try:
            return float(self.values[name])
        except ValueError:
            raise self.bad(name) from None

    def integer(self, name: str, base: int = 10) -> int | None:
        """Field ``name`` as an integer in ``base`` (16 accepts ``0x``), ``None`` when a
        placeholder."""
        if self.placeholder(name) is not None:
            return None
        try:
            return int(self.values[name], base)
        except ValueError:
            raise self.bad(name) from None

    def text(self, name: str) -> str | None:
        """Field ``name`` as text, ``None`` when a placeholder or empty."""
        if self.placeholder(name) is not None:
            return None
        return self.values[name] or None


def _throttle(reader: _LineReader) -> tuple[str, ...] | None:
    mask = reader.integer("clocks_throttle_reasons.active", 16)
    return None if mask is None else throttle_names(mask)


def parse_line(line: str, fields: Sequence[str] = QUERY_FIELDS) -> GpuDevice:
    """One CSV line of a GPU query over ``fields`` (separated by ``", "``) to a device
    (memory GiB, temperature degC, utilisation %, power W).

    Placeholders follow the module rules (unknown field, field error, or a failed
    ``unhealthy`` device for a lost / reset-needing GPU). Raises
    :class:`~chiffon_worker.errors.GpuProbeError` naming the line when it has the wrong
    number of fields, an unreadable index, an empty name, or a field that is neither a
    reading of its kind nor a placeholder.
    """
    reader = _LineReader(line, dict(zip(fields, _split(line, len(fields), 1), strict=True)))
    index = reader.integer("index")
    if index is None:
        raise reader.bad("index")
    if not reader.values["name"]:
        raise GpuProbeError(f"nvidia-smi: empty name in line {line.strip()!r}")
    name = reader.text("name")
    total_text = placeholder_text(reader.values["memory.total"])
    device = GpuDevice(
        index=index,
        vendor="nvidia",
        name=name or f"NVIDIA GPU {index}",
        vram_total_gb=_mib_to_gib(reader.number("memory.total")),
        vram_available_gb=_mib_to_gib(reader.number("memory.free")),
        utilization_percent=reader.number("utilization.gpu"),
        temperature_c=reader.number("temperature.gpu"),
        source=SOURCE,
        uuid=reader.text("uuid"),
        power_draw_w=reader.number("power.draw"),
        power_limit_w=reader.number("enforced.power.limit"),
        throttle_reasons=_throttle(reader),
        ecc_uncorrected_volatile=reader.integer("ecc.errors.uncorrected.volatile.total"),
    )
    if reader.fatal is not None:
        error = f"nvidia-smi: {reader.fatal}"
        return replace(GpuDevice.failed(index, "nvidia", device.name, SOURCE, error),
                       uuid=device.uuid)
    # Unified memory (GB10-class): the GPU answers, but has no memory of its own to tell.
    unified = name is not None and total_text is not None and _is_untold(total_text)
    return replace(device, unified=unified, field_errors=tuple(reader.field_errors))


def _leading_index(line: str) -> int | None:
    try:
        return int(line.split(",", 1)[0].strip())
    except ValueError:
        return None


def parse_query_output(text: str, fields: Sequence[str] = QUERY_FIELDS
                       ) -> tuple[GpuDevice, ...]:
    """All devices in the output of a GPU query over ``fields``; blank lines are ignored.

    A line :func:`parse_line` rejects becomes a failed device when its index is readable
    and is skipped (logged as a warning) otherwise. Raises
    :class:`~chiffon_worker.errors.GpuProbeError` (the first line's error) only when
    there were lines and none gave a device.
    """
    devices: list[GpuDevice] = []
    first_error: GpuProbeError | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            devices.append(parse_line(line, fields))
        except GpuProbeError as exc:
            first_error = first_error or exc
            index = _leading_index(line)
            if index is None:
                log.warning("%s (line skipped)", exc)
            else:
                devices.append(GpuDevice.failed(index, "nvidia", f"NVIDIA GPU {index}",
                                                SOURCE, str(exc)))
    if not devices and first_error is not None:
        raise first_error
    return tuple(devices)


def _process_line(line: str) -> tuple[str, GpuProcess]:
    """One line of the process query: the GPU's UUID and the process (memory GiB)."""
    gpu_uuid, pid_s, name, mib_s = _split(line, len(APPS_FIELDS), 2)
    bad = GpuProbeError(f"nvidia-smi: bad process line {line.strip()!r}")
    if not gpu_uuid or placeholder_text(gpu_uuid) is not None:
        raise bad
    try:
        pid = int(pid_s)
        mib = None if placeholder_text(mib_s) is not None else float(mib_s)
    except ValueError:
        raise bad from None
    shown = None if not name or placeholder_text(name) is not None else name
    return gpu_uuid, GpuProcess(pid=pid, name=shown, memory_gb=_mib_to_gib(mib))


def parse_compute_apps(text: str) -> dict[str, tuple[GpuProcess, ...]]:
    """The output of :data:`APPS_QUERY_ARGS` as processes by GPU UUID (memory GiB, from
    MiB; ``None`` when a placeholder, as under MIG or without permission). Empty output
    means no process. Raises :class:`~chiffon_worker.errors.GpuProbeError` naming a line
    that is not ``uuid, pid, name, MiB``."""
    found: dict[str, list[GpuProcess]] = {}
    for line in text.splitlines():
        if line.strip():
            gpu_uuid, process = _process_line(line)
            found.setdefault(gpu_uuid, []).append(process)
    return {gpu_uuid: tuple(processes) for gpu_uuid, processes in found.items()}


def exit_error(returncode: int, stdout: str, stderr: str) -> GpuProbeError:
    """The error for a non-zero exit status, with the tool's own first message line."""
    meaning = EXIT_MEANINGS.get(returncode, f"exit status {returncode}")
    # Exit 18 prints its message on stdout, the others on stderr: show whichever has text.
    message = next((ln.strip() for ln in (stderr + "\n" + stdout).splitlines() if ln.strip()),
                   "")
    text = f"nvidia-smi: {meaning} (exit {returncode})"
    if message:
        text += f": {message[:200]}"
    return GpuProbeError(text)


def pci_address(bus_id: str) -> str:
    """nvidia-smi's bus id (``00000000:3B:00.0``) in sysfs form (``0000:3b:00.0``)."""
    domain, rest = bus_id.split(":", 1)
    return f"{int(domain, 16):04x}:{rest.lower()}"


def lost_devices(stderr: str, first_index: int) -> tuple[GpuDevice, ...]:
    """A failed, ``unhealthy`` device for each GPU that stderr says could not be opened
    (``Unable to determine the device handle for GPU<bus id>: <reason>``), indexed from
    ``first_index`` on (nvidia-smi does not tell their index)."""
    devices: list[GpuDevice] = []
    for match in _HANDLE_ERROR.finditer(stderr):
        address = pci_address(match["pci"])
        device = GpuDevice.failed(first_index + len(devices), "nvidia", f"NVIDIA GPU {address}",
                                  SOURCE, f"nvidia-smi: {match['reason'].strip()}")
        devices.append(replace(device, extra={"pci_address": address}))
    return tuple(devices)


def _with_processes(devices: tuple[GpuDevice, ...],
                    processes: dict[str, tuple[GpuProcess, ...]]) -> tuple[GpuDevice, ...]:
    """Each readable device with a UUID gets its processes (``()`` for none)."""
    return tuple(replace(d, processes=processes.get(d.uuid, ()))
                 if d.uuid is not None and d.error is None else d for d in devices)


def _with_process_error(devices: tuple[GpuDevice, ...], reason: str
                        ) -> tuple[GpuDevice, ...]:
    """Each readable device with a UUID gets the field error ``processes: <reason>``."""
    return tuple(replace(d, field_errors=(*d.field_errors, f"processes: {reason}"))
                 if d.uuid is not None and d.error is None else d for d in devices)


def _apps_output(done: CompletedCommand) -> str:
    """The stdout of a finished process query. A non-zero exit is an error, unless every
    stderr line only names a GPU that could not be opened: that GPU is reported failed by
    the GPU query, and the processes printed for the others stand."""
    complaints = [ln for ln in done.stderr.splitlines() if ln.strip()]
    if done.returncode == 0 or (complaints and all(_HANDLE_ERROR.search(ln)
                                                   for ln in complaints)):
        return done.stdout
    raise exit_error(done.returncode, done.stdout, done.stderr)


class NvidiaSmiSource:
    """Reads NVIDIA GPUs by running ``nvidia-smi`` (bounded; see :mod:`.bounded_subprocess`).

    Remembers, for its lifetime, a driver that rejects the depth fields. ``clock``
    (monotonic seconds) is injectable for tests.
    """

    name = SOURCE

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.extended_supported = True

    def read(self, timeout_s: float) -> tuple[GpuDevice, ...]:
        """Run the GPU query, then the process query, both within ``timeout_s`` seconds
        (+ reap grace); devices come in the tool's order, then GPUs named lost on stderr.

        Raises ``GpuSourceUnavailable`` (no nvidia-smi), ``ProbeTimeout`` (the GPU query
        ran out of time) or ``GpuProbeError`` (non-zero exit with no readable GPU line,
        or output in which no line parses). The process query never raises: its failure
        is a field error on each device.
        """
        deadline = self._clock() + timeout_s
        done, fields = self._query_gpus(deadline)
        devices = self._devices(done, fields)
        if "uuid" in fields:  # processes are mapped to GPUs by UUID
            devices = self._add_processes(devices, deadline)
        log.debug("nvidia-smi: %d device(s) in %.3f s", len(devices), done.duration_s)
        return devices

    def _left(self, deadline: float) -> float:
        return deadline - self._clock()

    def _query_gpus(self, deadline: float) -> tuple[CompletedCommand, Sequence[str]]:
        """The finished GPU query and the fields it asked for."""
        if self.extended_supported:
            done = run_bounded(QUERY_ARGS, max(0.0, self._left(deadline)))
            if done.returncode != EXIT_INVALID_ARGUMENT:
                return done, QUERY_FIELDS
            self.extended_supported = False
            log.info("nvidia-smi rejects the depth fields (%s); using the short query "
                     "from now on", exit_error(done.returncode, done.stdout, done.stderr))
            left = self._left(deadline)
            if left <= 0:
                raise ProbeTimeout("nvidia-smi: no time left for the short query")
        return run_bounded(SHORT_QUERY_ARGS, max(0.0, self._left(deadline))), SHORT_FIELDS

    def _devices(self, done: CompletedCommand, fields: Sequence[str]) -> tuple[GpuDevice, ...]:
        """The devices of a finished GPU query; with a non-zero exit, those it still
        printed plus the GPUs stderr names as lost (else the exit error is raised)."""
        if done.returncode == 0:
            return parse_query_output(done.stdout, fields)
        error = exit_error(done.returncode, done.stdout, done.stderr)
        try:
            devices = parse_query_output(done.stdout, fields)
        except GpuProbeError:
            raise error from None
        if not devices:
            raise error
        log.warning("%s; reporting the %d GPU line(s) it printed", error, len(devices))
        first_free = max(d.index for d in devices) + 1
        return devices + lost_devices(done.stderr, first_free)

    def _add_processes(self, devices: tuple[GpuDevice, ...], deadline: float
                       ) -> tuple[GpuDevice, ...]:
        left = self._left(deadline)
        if left <= 0:
            return _with_process_error(devices, "no time left")
        try:
            processes = parse_compute_apps(_apps_output(run_bounded(APPS_QUERY_ARGS, left)))
        except (GpuProbeError, GpuSourceUnavailable) as exc:
            log.debug("nvidia-smi process query: %s", exc)
            return _with_process_error(devices, str(exc))
        return _with_processes(devices, processes)
