"""NVIDIA GPUs through the ``nvidia-smi`` command (the fallback when NVML cannot be loaded).

The query is fixed (:data:`QUERY_ARGS`); memory arrives in MiB and leaves as GiB.
Parsing (:func:`parse_query_output`) is a pure function. Every documented non-zero exit
status maps to a :class:`~chiffon_worker.errors.GpuProbeError` with a specific text;
unparsable output is a ``GpuProbeError`` naming the bad line.
"""

from __future__ import annotations

import logging

from chiffon_worker.errors import GpuProbeError
from chiffon_worker.metrics.bounded_subprocess import run_bounded
from chiffon_worker.metrics.gpu_types import GpuDevice

log = logging.getLogger(__name__)

SOURCE = "nvidia-smi"
FIELDS = ("index", "name", "memory.total", "memory.free", "utilization.gpu", "temperature.gpu")
QUERY_ARGS = (
    "nvidia-smi",
    "--query-gpu=" + ",".join(FIELDS),
    "--format=csv,noheader,nounits",
)
#: Field values meaning "the platform does not tell" (reported as ``None``).
UNKNOWN_VALUES = frozenset({"[N/A]", "N/A", "[Not Supported]", "[Insufficient Permissions]",
                            "[Unknown Error]", "[GPU is lost]"})
#: Documented exit statuses of nvidia-smi and what they mean.
EXIT_MEANINGS = {
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


def _optional_number(field: str, value: str, line: str) -> float | None:
    if value in UNKNOWN_VALUES:
        return None
    try:
        return float(value)
    except ValueError:
        raise GpuProbeError(f"nvidia-smi: bad {field} {value!r} in line {line!r}") from None


def _mib_to_gib(mib: float | None) -> float | None:
    return None if mib is None else round(mib / _MIB_PER_GIB, 3)


def parse_line(line: str) -> GpuDevice:
    """One CSV line of the query (fields separated by ``", "``) to a device (GiB, degC, %).

    Raises :class:`~chiffon_worker.errors.GpuProbeError` naming the line when it does not
    have the expected six fields or a field is neither a number nor a known placeholder.
    """
    parts = [p.strip() for p in line.split(",")]
    if len(parts) > len(FIELDS):
        # A GPU name containing ", " (none known, but cheap to allow): rejoin the middle.
        extra = len(parts) - len(FIELDS)
        parts = [parts[0], ", ".join(parts[1:2 + extra]), *parts[2 + extra:]]
    if len(parts) != len(FIELDS):
        raise GpuProbeError(
            f"nvidia-smi: expected {len(FIELDS)} fields, got {len(parts)} in line {line!r}")
    index_s, name, total_s, free_s, util_s, temp_s = parts
    try:
        index = int(index_s)
    except ValueError:
        raise GpuProbeError(f"nvidia-smi: bad index {index_s!r} in line {line!r}") from None
    if not name:
        raise GpuProbeError(f"nvidia-smi: empty name in line {line!r}")
    total = _optional_number("memory.total", total_s, line)
    free = _optional_number("memory.free", free_s, line)
    util = _optional_number("utilization.gpu", util_s, line)
    temp = _optional_number("temperature.gpu", temp_s, line)
    return GpuDevice(
        index=index,
        vendor="nvidia",
        name=name,
        vram_total_gb=_mib_to_gib(total),
        vram_available_gb=_mib_to_gib(free),
        utilization_percent=util,
        temperature_c=temp,
        source=SOURCE,
    )


def parse_query_output(text: str) -> tuple[GpuDevice, ...]:
    """All devices in the output of :data:`QUERY_ARGS`; blank lines are ignored."""
    return tuple(parse_line(line) for line in text.splitlines() if line.strip())


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


class NvidiaSmiSource:
    """Reads NVIDIA GPUs by running ``nvidia-smi`` (bounded; see :mod:`.bounded_subprocess`)."""

    name = SOURCE

    def read(self, timeout_s: float) -> tuple[GpuDevice, ...]:
        """Run the query and parse it; waits at most ``timeout_s`` seconds (+ reap grace).

        Raises ``GpuSourceUnavailable`` (no nvidia-smi), ``ProbeTimeout`` or
        ``GpuProbeError`` (non-zero exit, unparsable output).
        """
        done = run_bounded(QUERY_ARGS, timeout_s)
        if done.returncode != 0:
            raise exit_error(done.returncode, done.stdout, done.stderr)
        devices = parse_query_output(done.stdout)
        log.debug("nvidia-smi: %d device(s) in %.3f s", len(devices), done.duration_s)
        return devices
