"""NVIDIA GPUs through NVML (``nvidia-ml-py``, ``import pynvml``): the only module that
touches pynvml.

* ``pynvml`` is imported lazily, on the first :meth:`NvmlSource.read`, never at import time.
* ``nvmlInit()`` runs once per process (:func:`shared_source`); device handles are
  fetched once and reused (a re-init can take seconds without persistence mode). A failed
  init is retried at most every ``retry_s`` seconds (60 by default); in between, the same
  failure is raised again at no cost.
* Every NVML function is called through :meth:`NvmlSource._query`, the one choke point
  that knows which NVML errors mean "not supported here", which mean "this binding or
  driver lacks the function" (remembered, logged once, never asked again) and which mean
  trouble.
* Without the binding or ``libnvidia-ml.so.1``: :class:`~chiffon_worker.errors.GpuSourceUnavailable`
  (the caller tries ``nvidia-smi`` next). A driver that is present but unusable (not
  loaded, version mismatch, no permission, unknown): :class:`~chiffon_worker.errors.GpuProbeError`
  with a clear text.
* Per device, one call per reading: name, UUID, memory, utilisation, temperature, power
  draw and enforced limit, clock-throttle reasons, volatile uncorrected ECC errors,
  compute and graphics processes, MIG units. A reading the device does not support is
  ``None`` (no error); one that fails otherwise is ``None`` with
  ``"<field>: <NVML error text>"`` in :attr:`GpuDevice.field_errors`. A device whose
  memory is "not supported" while it answers otherwise uses system memory (GB10 / DGX
  Spark): ``unified``. A GPU that is lost or needs a reset is reported as a failed
  (``unhealthy``) device; the others are still reported.

Units: memory in GiB (2**30 bytes, from NVML's bytes), temperature in degrees C,
utilisation in percent, power in watts (from NVML's milliwatts, 0.1 W resolution).
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import psutil

from chiffon_worker.errors import GpuProbeError, GpuSourceUnavailable
from chiffon_worker.metrics.gpu_health import throttle_names
from chiffon_worker.metrics.gpu_types import GpuDevice, GpuProcess, MigUnit, bytes_to_gib
from chiffon_worker.metrics.sysfs import read_text
from chiffon_worker.process_local import ProcessLocal

log = logging.getLogger(__name__)

SOURCE = "nvml"
#: Source name of NVIDIA devices reported from sysfs because they are runtime-suspended.
SUSPENDED_SOURCE = "nvidia-sysfs"
NVIDIA_VENDOR_ID = "0x10de"
#: What a failing ``nvmlInit()`` means, by the binding's exception class name.
INIT_ERROR_TEXT = {
    "NVMLError_DriverNotLoaded": "NVML: NVIDIA driver is not loaded",
    "NVMLError_LibRmVersionMismatch": "NVML: driver/library version mismatch "
                                      "(reload the nvidia kernel module or reboot)",
    "NVMLError_NoPermission": "NVML: no permission to access the GPU "
                              "(check /dev/nvidia* permissions)",
    "NVMLError_Unknown": "NVML: unknown error during initialisation",
}
#: NVML errors that put a whole device out of service, with the device's error text.
DEVICE_ERROR_TEXT = {
    "NVMLError_GpuIsLost": "NVML: GPU is lost",
    "NVMLError_ResetRequired": "NVML: GPU requires reset",
}
#: NVML's "value not available" for 64-bit counters (``usedGpuMemory`` under WDDM/MIG).
NOT_AVAILABLE_U64 = 2**64 - 1
#: Fallbacks for constants an old binding may not define (values from nvml.h).
NVML_DEVICE_MIG_ENABLE = 1
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
#: Each process list: the binding's unversioned wrapper (``_v3`` symbol, drivers >= 510),
#: then ``_v2`` (drivers 450-470, same struct in the binding).
COMPUTE_PROCESSES = ("nvmlDeviceGetComputeRunningProcesses",
                     "nvmlDeviceGetComputeRunningProcesses_v2")
GRAPHICS_PROCESSES = ("nvmlDeviceGetGraphicsRunningProcesses",
                      "nvmlDeviceGetGraphicsRunningProcesses_v2")
#: Clock-event reasons: the current name (drivers >= 535), then the deprecated one.
THROTTLE_REASONS = ("nvmlDeviceGetCurrentClocksEventReasons",
                    "nvmlDeviceGetCurrentClocksThrottleReasons")

ModuleLoader = Callable[[], ModuleType]
T = TypeVar("T")
#: What :meth:`NvmlSource._memory` reads when NVML answers "not supported" (unified memory).
_UNSUPPORTED = object()


def load_pynvml() -> ModuleType:
    """The real binding (``nvidia-ml-py``); imported on first use only."""
    return importlib.import_module("pynvml")


class _NeverRaised(Exception):
    """Stands in for an NVML error class a (fake or old) binding does not define."""


class FunctionMissing(GpuProbeError):
    """The binding or the driver lacks an NVML function (old nvidia-ml-py or old driver).

    For an optional reading this means "not supported here"; for a required one the
    binding is unusable, hence a :class:`GpuProbeError`.
    """


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _bind(fn: Callable[..., T], *args: Any) -> Callable[[], T]:
    """``fn`` with ``args`` bound (a typed ``functools.partial`` for a loop)."""
    return lambda: fn(*args)


def milliwatts_to_watts(value: Any) -> float:
    """NVML milliwatts to watts, rounded to 0.1 W."""
    return round(int(value) / 1000.0, 1)


def used_bytes(value: Any) -> int | None:
    """A process's ``usedGpuMemory`` in bytes; ``None`` when NVML does not know it (the
    binding's ``None``, or the raw ``NVML_VALUE_NOT_AVAILABLE``)."""
    if value is None:
        return None
    number = int(value)
    return None if number == NOT_AVAILABLE_U64 else number


def process_name(pid: int) -> str | None:
    """The executable name of ``pid``; ``None`` when it is not visible here (gone, no
    permission, or a host pid from outside this PID namespace).

    NVML reports pids as the host sees them: in a container a host pid may name an
    unrelated local process; nothing cheap tells the two apart, so the name is a hint.
    """
    try:
        return psutil.Process(pid).name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def merge_processes(*lists: Iterable[Any]) -> tuple[GpuProcess, ...]:
    """NVML process entries (``.pid``, ``.usedGpuMemory`` in bytes) from several lists
    (compute, graphics) as one tuple by pid: a process in several lists once, with the
    largest memory any list knows (GiB; ``None`` when none does)."""
    memory: dict[int, int | None] = {}
    for entries in lists:
        for entry in entries:
            pid = int(entry.pid)
            known = [m for m in (memory.get(pid), used_bytes(entry.usedGpuMemory))
                     if m is not None]
            memory[pid] = max(known) if known else None
    return tuple(GpuProcess(pid=pid, name=process_name(pid),
                            memory_gb=None if used is None else bytes_to_gib(used))
                 for pid, used in sorted(memory.items()))


class NvmlSource:
    """NVIDIA devices read through NVML; thread-safe, initialised once per instance.

    ``load`` returns the pynvml module (injectable for tests); ``retry_s`` is how long a
    failed initialisation is remembered before ``nvmlInit()`` is tried again (seconds);
    ``clock`` is the monotonic clock used for that.
    """

    name = SOURCE

    def __init__(self, load: ModuleLoader = load_pynvml, retry_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._load = load
        self._retry_s = retry_s
        self._clock = clock
        self._lock = threading.Lock()
        self._nv: ModuleType | None = None
        self._initialised = False
        self._handles: list[Any] = []
        self._identity: dict[int, tuple[str, str | None]] = {}  # index -> (name, uuid)
        self._failure: tuple[float, type[Exception], str] | None = None
        self._memory_v2: bool | None = None  # None: not tried yet
        self._missing: set[str] = set()  # functions the binding or driver lacks
        self.init_calls = 0  # how many times nvmlInit() was attempted (for diagnostics)

    # -- the choke point -------------------------------------------------------------------

    def _error_class(self, name: str) -> type[BaseException]:
        assert self._nv is not None
        cls = getattr(self._nv, name, None)
        return cls if isinstance(cls, type) and issubclass(cls, BaseException) else _NeverRaised

    def _query(self, fn_name: str, *args: Any, optional: bool = False,
               key: str | None = None, **kwargs: Any) -> Any:
        """Call ``pynvml.<fn_name>(*args, **kwargs)``: the only place NVML functions run.

        With ``optional``, "not supported" (e.g. utilisation under MIG, memory on a
        unified-memory system) returns ``None``. A function the binding does not define
        or the driver does not export raises :class:`FunctionMissing` and is remembered
        under ``key`` (default ``fn_name``): it is not called again, and is logged once.
        Every other NVML error propagates as the binding's ``NVMLError`` subclass, for the
        caller to interpret.
        """
        assert self._nv is not None
        key = key or fn_name
        if key in self._missing:
            raise FunctionMissing(f"NVML: {key} is not available")
        fn = getattr(self._nv, fn_name, None)
        if fn is None:
            raise self._missing_function(key, "not in this nvidia-ml-py")
        try:
            return fn(*args, **kwargs)
        except self._error_class("NVMLError_NotSupported"):
            if optional:
                return None
            raise
        except (self._error_class("NVMLError_FunctionNotFound"),
                self._error_class("NVMLLibraryMismatchError")) as exc:
            raise self._missing_function(key, f"not in this driver ({type(exc).__name__})") \
                from exc

    def _missing_function(self, key: str, why: str) -> FunctionMissing:
        self._missing.add(key)
        log.info("NVML: %s is %s; not asked again", key, why)
        return FunctionMissing(f"NVML: {key} is not available")

    def _first(self, fn_names: tuple[str, ...], *args: Any) -> Any:
        """The first of ``fn_names`` that binding and driver have, called with ``args``;
        :class:`FunctionMissing` when none is there."""
        for fn_name in fn_names:
            try:
                return self._query(fn_name, *args)
            except FunctionMissing:
                continue
        raise FunctionMissing(f"NVML: none of {', '.join(fn_names)} is available")

    def _device_fatal(self) -> tuple[type[BaseException], ...]:
        """NVML errors that concern the whole device (or NVML itself), not one reading."""
        return (self._error_class("NVMLError_GpuIsLost"),
                self._error_class("NVMLError_ResetRequired"),
                self._error_class("NVMLError_Uninitialized"))

    def _field(self, field_name: str, errors: list[str], read: Callable[[], T]) -> T | None:
        """One optional reading: its value; ``None`` when NVML does not support it here or
        lacks the function; ``None`` and ``"<field_name>: <NVML error text>"`` appended to
        ``errors`` when it failed otherwise. Device-wide errors propagate."""
        try:
            return read()
        except (FunctionMissing, self._error_class("NVMLError_NotSupported")):
            return None
        except self._device_fatal():
            raise
        except self._error_class("NVMLError") as exc:
            log.debug("NVML %s failed: %s", field_name, exc)
            errors.append(f"{field_name}: {exc}")
            return None

    # -- initialisation --------------------------------------------------------------------

    def _init_locked(self) -> None:
        if self._initialised:
            return
        now = self._clock()
        if self._failure is not None:
            failed_at, kind, text = self._failure
            if now - failed_at < self._retry_s:
                raise kind(text)
        try:
            self._init_once()
        except (GpuSourceUnavailable, GpuProbeError) as exc:
            self._failure = (now, type(exc), str(exc))
            log.info("%s", exc)
            raise
        self._failure = None

    def _init_once(self) -> None:
        if self._nv is None:
            try:
                self._nv = self._load()
            except ImportError as exc:
                raise GpuSourceUnavailable(f"NVML: python binding not importable: {exc}") from exc
        nvml_error = self._error_class("NVMLError")
        self.init_calls += 1
        try:
            self._query("nvmlInit")
        except self._error_class("NVMLError_LibraryNotFound") as exc:
            raise GpuSourceUnavailable("NVML: libnvidia-ml.so.1 not found") from exc
        except nvml_error as exc:
            text = INIT_ERROR_TEXT.get(type(exc).__name__, f"NVML: nvmlInit failed: {exc}")
            raise GpuProbeError(text) from exc
        try:
            count = int(self._query("nvmlDeviceGetCount"))
        except nvml_error as exc:
            self._shutdown_quietly()
            raise GpuProbeError(f"NVML: cannot count devices: {exc}") from exc
        self._handles = [None] * count
        self._initialised = True
        log.info("NVML initialised: %d device(s)", count)

    def _shutdown_quietly(self) -> None:
        if self._nv is None:
            return
        try:
            self._query("nvmlShutdown")
        except self._error_class("NVMLError") as exc:
            log.debug("nvmlShutdown: %s", exc)

    # -- per device ------------------------------------------------------------------------

    def _memory_info(self, handle: Any) -> Any:
        """NVML's memory struct for ``handle`` (bytes), v2 where the driver has it, else
        v1; ``None`` when memory is not supported (unified memory)."""
        assert self._nv is not None
        if self._memory_v2 is not False:
            version = getattr(self._nv, "nvmlMemory_v2", None)
            if version is None:
                self._memory_v2 = False
            else:
                try:
                    info = self._query("nvmlDeviceGetMemoryInfo", handle, version=version,
                                       optional=True, key="nvmlDeviceGetMemoryInfo_v2")
                    self._memory_v2 = True
                    return info
                except FunctionMissing:  # logged by _query
                    self._memory_v2 = False
                except (self._error_class("NVMLError_ArgumentVersionMismatch"), TypeError):
                    log.info("NVML: nvmlDeviceGetMemoryInfo_v2 unusable here; using v1")
                    self._memory_v2 = False
        return self._query("nvmlDeviceGetMemoryInfo", handle, optional=True)

    def _memory(self, handle: Any, errors: list[str]
                ) -> tuple[float | None, float | None, bool]:
        """(total, available) in GiB, and whether the device has unified memory (NVML
        does not support memory info on it); ``None`` where memory could not be read."""
        def read() -> Any:
            info = self._memory_info(handle)
            return _UNSUPPORTED if info is None else info

        info = self._field("vram_total_gb", errors, read)
        if info is _UNSUPPORTED:
            return None, None, True
        if info is None:
            return None, None, False
        return bytes_to_gib(int(info.total)), bytes_to_gib(int(info.free)), False

    def _processes(self, handle: Any, errors: list[str]) -> tuple[GpuProcess, ...] | None:
        """Compute and graphics processes on the device; ``None`` when neither list can be
        read (or either failed: a partial list would under-report)."""
        lists: list[Any] = []
        for fn_names in (COMPUTE_PROCESSES, GRAPHICS_PROCESSES):
            before = len(errors)
            found = self._field("processes", errors, _bind(self._first, fn_names, handle))
            if len(errors) > before:
                return None
            if found is not None:
                lists.append(found)
        return merge_processes(*lists) if lists else None

    def _mig_units(self, handle: Any) -> tuple[MigUnit, ...]:
        """The MIG units of the device (empty when MIG is off); NVML errors propagate."""
        assert self._nv is not None
        mode = self._query("nvmlDeviceGetMigMode", handle)
        enabled = getattr(self._nv, "NVML_DEVICE_MIG_ENABLE", NVML_DEVICE_MIG_ENABLE)
        if int(mode[0]) != enabled:
            return ()
        units: list[MigUnit] = []
        for slot in range(int(self._query("nvmlDeviceGetMaxMigDeviceCount", handle))):
            try:
                unit = self._query("nvmlDeviceGetMigDeviceHandleByIndex", handle, slot)
            except self._error_class("NVMLError_NotFound"):
                continue  # an empty slot
            uuid = self._query("nvmlDeviceGetUUID", unit, optional=True)
            info = self._memory_info(unit)
            units.append(MigUnit(
                index=slot, name=_as_text(self._query("nvmlDeviceGetName", unit)),
                memory_total_gb=None if info is None else bytes_to_gib(int(info.total)),
                memory_available_gb=None if info is None else bytes_to_gib(int(info.free)),
                uuid=None if uuid is None else _as_text(uuid)))
        return tuple(units)

    def _handle(self, index: int) -> Any:
        handle = self._handles[index]
        if handle is None:
            handle = self._query("nvmlDeviceGetHandleByIndex", index)
            self._handles[index] = handle
        return handle

    def _device(self, index: int) -> GpuDevice:
        assert self._nv is not None
        handle = self._handle(index)
        name = _as_text(self._query("nvmlDeviceGetName", handle))
        errors: list[str] = []
        uuid = self._field("uuid", errors,
                           lambda: _as_text(self._query("nvmlDeviceGetUUID", handle)))
        self._identity[index] = (name, uuid)
        total, available, unified = self._memory(handle, errors)
        util = self._field("utilization_percent", errors, lambda: float(
            self._query("nvmlDeviceGetUtilizationRates", handle).gpu))
        temperature_sensor = getattr(self._nv, "NVML_TEMPERATURE_GPU", 0)
        temp = self._field("temperature_c", errors, lambda: float(
            self._query("nvmlDeviceGetTemperature", handle, temperature_sensor)))
        power = self._field("power_draw_w", errors, lambda: milliwatts_to_watts(
            self._query("nvmlDeviceGetPowerUsage", handle)))
        limit = self._field("power_limit_w", errors, lambda: milliwatts_to_watts(
            self._query("nvmlDeviceGetEnforcedPowerLimit", handle)))
        throttle = self._field("throttle_reasons", errors, lambda: throttle_names(
            int(self._first(THROTTLE_REASONS, handle))))
        ecc_type = getattr(self._nv, "NVML_MEMORY_ERROR_TYPE_UNCORRECTED",
                           NVML_MEMORY_ERROR_TYPE_UNCORRECTED)
        ecc_counter = getattr(self._nv, "NVML_VOLATILE_ECC", NVML_VOLATILE_ECC)
        ecc = self._field("ecc_uncorrected_volatile", errors, lambda: int(
            self._query("nvmlDeviceGetTotalEccErrors", handle, ecc_type, ecc_counter)))
        processes = self._processes(handle, errors)
        mig = self._field("mig", errors, lambda: self._mig_units(handle)) or ()
        return GpuDevice(
            index=index, vendor="nvidia", name=name, uuid=uuid,
            vram_total_gb=total, vram_available_gb=available, unified=unified,
            utilization_percent=util, temperature_c=temp,
            power_draw_w=power, power_limit_w=limit, throttle_reasons=throttle,
            ecc_uncorrected_volatile=ecc, processes=processes, mig=mig,
            field_errors=tuple(errors), source=SOURCE,
        )

    def _failed_device(self, index: int, exc: BaseException) -> GpuDevice:
        """The device as failed (``unhealthy``), keeping the name and UUID last read."""
        name, uuid = self._identity.get(index, ("NVIDIA GPU", None))
        text = DEVICE_ERROR_TEXT.get(type(exc).__name__,
                                     f"NVML: {type(exc).__name__}: {exc}")
        return replace(GpuDevice.failed(index, "nvidia", name, SOURCE, text), uuid=uuid)

    # -- public ----------------------------------------------------------------------------

    def read(self, timeout_s: float = 0.0) -> tuple[GpuDevice, ...]:
        """Every NVIDIA device NVML sees (GiB, degC, %, W).

        ``timeout_s`` is accepted for the common source interface and ignored: NVML runs
        in-process, so its bound is enforced by the probe runner's thread. Raises
        ``GpuSourceUnavailable`` (no binding, no library) or ``GpuProbeError``.
        """
        del timeout_s
        with self._lock:
            self._init_locked()
            nvml_error = self._error_class("NVMLError")
            devices = []
            for index in range(len(self._handles)):
                try:
                    devices.append(self._device(index))
                except self._error_class("NVMLError_Uninitialized") as exc:
                    # Someone shut NVML down under us: initialise again on the next read.
                    self._initialised = False
                    self._handles = []
                    raise GpuProbeError("NVML: library was shut down; will re-initialise") \
                        from exc
                except nvml_error as exc:
                    log.debug("NVML device %d failed: %s", index, exc)
                    self._handles[index] = None  # fetch a fresh handle next time
                    devices.append(self._failed_device(index, exc))
            return tuple(devices)

    def close(self) -> None:
        """``nvmlShutdown()`` if initialised; skipped when a read is in progress (hung)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            if self._initialised:
                self._shutdown_quietly()
                self._initialised = False
                self._handles = []
        finally:
            self._lock.release()


def nvidia_pci_devices(sysfs_root: str) -> list[Path] | None:
    """NVIDIA display/3D controllers under ``<sysfs_root>/bus/pci/devices`` (vendor
    ``0x10de``, PCI class ``0x03xxxx``), ordered by address; ``None`` when that directory
    cannot be listed (sysfs not mounted there: nothing can be concluded).

    The PCI bus is used rather than ``class/drm`` because compute-only NVIDIA setups
    (no ``nvidia-drm``) have no DRM card entries.
    """
    base = Path(sysfs_root) / "bus" / "pci" / "devices"
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return None
    found: list[Path] = []
    for entry in entries:
        try:
            vendor = read_text(entry / "vendor")
            pci_class = read_text(entry / "class")
        except OSError:
            continue
        if vendor is not None and vendor.lower() == NVIDIA_VENDOR_ID and \
                pci_class is not None and pci_class.lower().startswith("0x03"):
            found.append(entry)
    return found


_shared: ProcessLocal[NvmlSource] = ProcessLocal(NvmlSource)


def shared_source() -> NvmlSource:
    """The process-wide :class:`NvmlSource` (NVML is initialised once per process).

    Created on first call; nothing is loaded until its first ``read``. A forked child
    gets a fresh one on its first call (NVML state does not survive ``fork``).
    """
    return _shared.get()


def suspended_nvidia_cards(sysfs_root: str) -> tuple[GpuDevice, ...] | None:
    """NVIDIA GPUs from sysfs, if there is at least one and every one is runtime-suspended.

    Querying NVML or nvidia-smi wakes a sleeping dGPU on hybrid laptops; sysfs
    ``power/runtime_status`` tells without waking it. Returns ``None`` when any NVIDIA
    GPU is awake, its status cannot be read, or none is listed: then NVML should be asked.
    Devices returned have unknown VRAM and ``extra={"power_state": "suspended"}``.
    """
    devices: list[GpuDevice] = []
    for position, pci in enumerate(nvidia_pci_devices(sysfs_root) or ()):
        try:
            status = read_text(pci / "power" / "runtime_status")
            device_id = read_text(pci / "device") or "?"
        except OSError:
            return None
        if status != "suspended":
            return None
        devices.append(GpuDevice(
            index=position, vendor="nvidia", name=f"NVIDIA GPU {device_id}",
            vram_total_gb=None, vram_available_gb=None, utilization_percent=None,
            temperature_c=None, source=SUSPENDED_SOURCE,
            extra={"power_state": "suspended", "pci_address": pci.name}))
    return tuple(devices) or None
