"""NVIDIA GPUs through NVML (``nvidia-ml-py``, ``import pynvml``): the only module that
touches pynvml.

* ``pynvml`` is imported lazily, on the first :meth:`NvmlSource.read`, never at import time.
* ``nvmlInit()`` runs once per process (:func:`shared_source`); device handles are
  fetched once and reused (a re-init can take seconds without persistence mode). A failed
  init is retried at most every ``retry_s`` seconds (60 by default); in between, the same
  failure is raised again at no cost.
* Every NVML function is called through :meth:`NvmlSource._query`, the one choke point
  that knows which NVML errors mean "not supported here" and which mean trouble.
* Without the binding or ``libnvidia-ml.so.1``: :class:`~chiffon_worker.errors.GpuSourceUnavailable`
  (the caller tries ``nvidia-smi`` next). A driver that is present but unusable (not
  loaded, version mismatch, no permission, unknown): :class:`~chiffon_worker.errors.GpuProbeError`
  with a clear text. One device failing (``GpuIsLost``) only marks that device's
  :attr:`GpuDevice.error`; the others are still reported.

Units: memory in GiB (2**30 bytes, from NVML's bytes), temperature in degrees C,
utilisation in percent.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from chiffon_worker.errors import GpuProbeError, GpuSourceUnavailable
from chiffon_worker.metrics.gpu_types import GpuDevice, bytes_to_gib
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

ModuleLoader = Callable[[], ModuleType]


def load_pynvml() -> ModuleType:
    """The real binding (``nvidia-ml-py``); imported on first use only."""
    return importlib.import_module("pynvml")


class _NeverRaised(Exception):
    """Stands in for an NVML error class a (fake or old) binding does not define."""


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


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
        self._failure: tuple[float, type[Exception], str] | None = None
        self._memory_v2: bool | None = None  # None: not tried yet
        self.init_calls = 0  # how many times nvmlInit() was attempted (for diagnostics)

    # -- the choke point -------------------------------------------------------------------

    def _error_class(self, name: str) -> type[BaseException]:
        assert self._nv is not None
        cls = getattr(self._nv, name, None)
        return cls if isinstance(cls, type) and issubclass(cls, BaseException) else _NeverRaised

    def _query(self, fn_name: str, *args: Any, optional: bool = False, **kwargs: Any) -> Any:
        """Call ``pynvml.<fn_name>(*args, **kwargs)``: the only place NVML functions run.

        With ``optional``, "not supported" (e.g. utilisation under MIG, memory on a
        unified-memory system) returns ``None``; every other NVML error propagates as the
        binding's ``NVMLError`` subclass, for the caller to interpret.
        """
        assert self._nv is not None
        fn = getattr(self._nv, fn_name)
        try:
            return fn(*args, **kwargs)
        except self._error_class("NVMLError_NotSupported"):
            if optional:
                return None
            raise

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

    def _memory(self, handle: Any) -> tuple[float | None, float | None]:
        """(total, available) in GiB; ``None`` where NVML does not report memory."""
        assert self._nv is not None
        info: Any = None
        if self._memory_v2 is not False:
            version = getattr(self._nv, "nvmlMemory_v2", None)
            if version is None:
                self._memory_v2 = False
            else:
                try:
                    info = self._query("nvmlDeviceGetMemoryInfo", handle, version=version,
                                       optional=True)
                    self._memory_v2 = True
                except (self._error_class("NVMLError_FunctionNotFound"),
                        self._error_class("NVMLError_ArgumentVersionMismatch"), TypeError):
                    log.info("NVML: nvmlDeviceGetMemoryInfo_v2 unavailable; using v1")
                    self._memory_v2 = False
        if self._memory_v2 is False:
            info = self._query("nvmlDeviceGetMemoryInfo", handle, optional=True)
        if info is None:
            return None, None
        return bytes_to_gib(int(info.total)), bytes_to_gib(int(info.free))

    def _device(self, index: int) -> GpuDevice:
        assert self._nv is not None
        handle = self._handles[index]
        if handle is None:
            handle = self._query("nvmlDeviceGetHandleByIndex", index)
            self._handles[index] = handle
        name = _as_text(self._query("nvmlDeviceGetName", handle))
        total, available = self._memory(handle)
        util = self._query("nvmlDeviceGetUtilizationRates", handle, optional=True)
        temp = self._query("nvmlDeviceGetTemperature", handle,
                           getattr(self._nv, "NVML_TEMPERATURE_GPU", 0), optional=True)
        return GpuDevice(
            index=index,
            vendor="nvidia",
            name=name,
            vram_total_gb=total,
            vram_available_gb=available,
            utilization_percent=None if util is None else float(util.gpu),
            temperature_c=None if temp is None else float(temp),
            source=SOURCE,
        )

    def _failed_device(self, index: int, exc: BaseException) -> GpuDevice:
        return GpuDevice.failed(index, "nvidia", "NVIDIA GPU", SOURCE,
                                f"NVML: {type(exc).__name__}: {exc}")

    # -- public ----------------------------------------------------------------------------

    def read(self, timeout_s: float = 0.0) -> tuple[GpuDevice, ...]:
        """Every NVIDIA device NVML sees (GiB, degC, %).

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
