"""A stand-in for the ``pynvml`` module (nvidia-ml-py), configurable per scenario.

It mirrors the real binding's surface that chiffon uses: the ``NVML_ERROR_*`` codes and
one ``NVMLError_<Name>`` subclass of ``NVMLError`` per code (same names, same values, same
texts), ``NVMLLibraryMismatchError``, ``nvmlMemory_v2``, ``NVML_TEMPERATURE_GPU``,
``NVML_MEMORY_ERROR_TYPE_UNCORRECTED``, ``NVML_VOLATILE_ECC``, ``NVML_DEVICE_MIG_ENABLE``,
and the functions ``nvmlInit``, ``nvmlShutdown``, ``nvmlDeviceGetCount``,
``nvmlDeviceGetHandleByIndex``, ``nvmlDeviceGetName``, ``nvmlDeviceGetUUID``,
``nvmlDeviceGetMemoryInfo(handle, version=None)``, ``nvmlDeviceGetUtilizationRates``,
``nvmlDeviceGetTemperature``, ``nvmlDeviceGetPowerUsage`` (mW),
``nvmlDeviceGetEnforcedPowerLimit`` (mW), ``nvmlDeviceGetCurrentClocksEventReasons`` and
``nvmlDeviceGetCurrentClocksThrottleReasons`` (bit mask), ``nvmlDeviceGetTotalEccErrors``,
``nvmlDeviceGetComputeRunningProcesses`` / ``nvmlDeviceGetGraphicsRunningProcesses`` (and
their ``_v2``; entries with ``.pid`` and ``.usedGpuMemory`` in bytes or ``None``),
``nvmlDeviceGetMigMode`` (``[current, pending]``), ``nvmlDeviceGetMaxMigDeviceCount``,
``nvmlDeviceGetMigDeviceHandleByIndex``. Every call is counted in ``module.calls`` so tests
can assert what was (not) called; a function left out of the module (``Scenario.absent``)
counts each lookup as ``calls["lookup:<name>"]``.

Numbers come from gpu-samples.md: the v2 memory sample of a 24 GiB card is
``RTX4090_V2`` below. Power, throttle, ECC and MIG values are chosen here (documented on
each fixture); pids above ``PID_MAX`` can never exist, so their names are unknown.
"""

from __future__ import annotations

import string
import threading
from collections import Counter
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace
from typing import Any

# The real binding's error codes (pynvml.py, "NVML_ERROR_*"); the classes are derived from
# these names exactly as the binding does: NVML_ERROR_GPU_IS_LOST -> NVMLError_GpuIsLost.
NVML_ERROR_CODES = {
    "NVML_ERROR_UNINITIALIZED": 1,
    "NVML_ERROR_INVALID_ARGUMENT": 2,
    "NVML_ERROR_NOT_SUPPORTED": 3,
    "NVML_ERROR_NO_PERMISSION": 4,
    "NVML_ERROR_ALREADY_INITIALIZED": 5,
    "NVML_ERROR_NOT_FOUND": 6,
    "NVML_ERROR_INSUFFICIENT_SIZE": 7,
    "NVML_ERROR_INSUFFICIENT_POWER": 8,
    "NVML_ERROR_DRIVER_NOT_LOADED": 9,
    "NVML_ERROR_TIMEOUT": 10,
    "NVML_ERROR_IRQ_ISSUE": 11,
    "NVML_ERROR_LIBRARY_NOT_FOUND": 12,
    "NVML_ERROR_FUNCTION_NOT_FOUND": 13,
    "NVML_ERROR_CORRUPTED_INFOROM": 14,
    "NVML_ERROR_GPU_IS_LOST": 15,
    "NVML_ERROR_RESET_REQUIRED": 16,
    "NVML_ERROR_OPERATING_SYSTEM": 17,
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH": 18,
    "NVML_ERROR_IN_USE": 19,
    "NVML_ERROR_MEMORY": 20,
    "NVML_ERROR_NO_DATA": 21,
    "NVML_ERROR_ARGUMENT_VERSION_MISMATCH": 25,
    "NVML_ERROR_UNKNOWN": 999,
}
#: The real binding's texts (``NVMLError._errcode_to_string``) for the codes tests use.
ERROR_TEXT = {
    "NVML_ERROR_UNINITIALIZED": "Uninitialized",
    "NVML_ERROR_INVALID_ARGUMENT": "Invalid Argument",
    "NVML_ERROR_NOT_SUPPORTED": "Not Supported",
    "NVML_ERROR_NO_PERMISSION": "Insufficient Permissions",
    "NVML_ERROR_NOT_FOUND": "Not Found",
    "NVML_ERROR_FUNCTION_NOT_FOUND": "Function Not Found",
    "NVML_ERROR_GPU_IS_LOST": "GPU is lost",
    "NVML_ERROR_RESET_REQUIRED": "GPU requires restart",
    "NVML_ERROR_UNKNOWN": "Unknown Error",
}
NVML_TEMPERATURE_GPU = 0
NVML_MEMORY_V2 = 0x02000028
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1
#: NVML_VALUE_NOT_AVAILABLE for 64-bit values (the real binding turns it into ``None``).
NOT_AVAILABLE = 2**64 - 1
#: The largest pid Linux can hand out (2**22): pids above it never exist.
PID_MAX = 4194304


def error_class_name(code_name: str) -> str:
    """``NVML_ERROR_GPU_IS_LOST`` -> ``NVMLError_GpuIsLost`` (the binding's rule)."""
    return "NVMLError_" + string.capwords(
        code_name.replace("NVML_ERROR_", ""), "_").replace("_", "")


#: A process entry: (pid, usedGpuMemory in bytes, or None / NOT_AVAILABLE when unknown).
FakeProcess = tuple[int, int | None]


@dataclass
class FakeGpu:
    """One device, or one MIG unit of a device (name, uuid and memory only).

    Memory in bytes; power in milliwatts. ``None`` for utilisation, temperature, uuid,
    power, ECC or MIG mode = that query raises NotSupported. ``errors``: NVML function
    name -> ``NVML_ERROR_*`` name that call raises on this device or MIG unit (the v2
    memory call is ``"nvmlDeviceGetMemoryInfo_v2"``); ``lost`` / ``reset_required`` of a
    device apply to its MIG units too. ``mig``: slot -> unit; other slots up to
    ``max_mig`` answer NOT_FOUND (empty).
    """

    name: str | bytes
    total: int
    free: int
    used: int
    reserved: int = 0
    utilization: int | None = 0
    temperature: int | None = 40
    lost: bool = False  # every per-device call raises NVMLError_GpuIsLost
    reset_required: bool = False  # every per-device call raises NVMLError_ResetRequired
    memory_supported: bool = True  # False: memory queries raise NotSupported (GB10-like)
    uuid: str | None = None
    compute: list[FakeProcess] = field(default_factory=list)
    graphics: list[FakeProcess] = field(default_factory=list)
    power_mw: int | None = None
    power_limit_mw: int | None = None
    throttle_mask: int = 0
    ecc_uncorrected: int | None = None
    mig_mode: int | None = None
    max_mig: int = 7
    mig: dict[int, FakeGpu] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


# gpu-samples.md, "v2 sample for a 24 GiB card" (bytes). A consumer card: ECC and MIG
# not supported; drawing 123.456 W of an enforced 450 W, software power cap active (0x4).
RTX4090_V2 = FakeGpu(name="NVIDIA GeForce RTX 4090", total=25757220864, reserved=398458880,
                     free=24946671616, used=412090368, utilization=2, temperature=38,
                     uuid="GPU-4090aaaa-0000-0000-0000-000000000000", power_mw=123456,
                     power_limit_mw=450000, throttle_mask=0x4)
# A second 24 GiB card (nvidia-smi sample: 24576 MiB total, 24245 MiB free); idle (0x1).
RTX3090 = FakeGpu(name="NVIDIA GeForce RTX 3090", total=24576 * 2**20, free=24245 * 2**20,
                  used=(24576 - 24245) * 2**20, utilization=0, temperature=31,
                  uuid="GPU-3090bbbb-0000-0000-0000-000000000000", power_mw=28500,
                  power_limit_mw=350000, throttle_mask=0x1)
# Two MIG 3g.40gb units of the A100 below (slots 0 and 3; the other slots are empty).
A100_MIG_UNITS = {
    0: FakeGpu(name="NVIDIA A100-SXM4-80GB MIG 3g.40gb", total=40192 * 2**20,
               free=20096 * 2**20, used=20096 * 2**20,
               uuid="MIG-a100a100-0000-0000-0000-000000000000"),
    3: FakeGpu(name="NVIDIA A100-SXM4-80GB MIG 3g.40gb", total=40192 * 2**20,
               free=25287 * 2**20, used=14905 * 2**20,
               uuid="MIG-a100a100-0000-0000-0000-000000000003"),
}
# MIG-enabled A100 (utilisation not supported under MIG); ECC on, no errors; 61.234 W of
# 400 W.
A100_MIG = FakeGpu(name="NVIDIA A100-SXM4-80GB", total=81920 * 2**20, free=45383 * 2**20,
                   used=(81920 - 45383) * 2**20, utilization=None, temperature=33,
                   uuid="GPU-a100a100-0000-0000-0000-000000000000", power_mw=61234,
                   power_limit_mw=400000, ecc_uncorrected=0,
                   mig_mode=NVML_DEVICE_MIG_ENABLE, mig=A100_MIG_UNITS)
# A GB10 (DGX Spark): unified memory, so NVML answers NOT_SUPPORTED for memory info.
GB10 = FakeGpu(name="NVIDIA GB10", total=0, free=0, used=0, utilization=5, temperature=45,
               memory_supported=False, uuid="GPU-gb10gb10-0000-0000-0000-000000000000",
               power_mw=11000, power_limit_mw=140000)


@dataclass
class Scenario:
    """What the fake machine looks like.

    ``init_error``: an ``NVML_ERROR_*`` name raised by ``nvmlInit``.
    ``memory_v2``: False makes the versioned memory call raise FunctionNotFound (old driver).
    ``hang``: if set, every ``nvmlDeviceGetName`` blocks until the event is set.
    ``absent``: functions this (old) binding does not define (``AttributeError``).
    ``old_driver``: functions the driver does not export: they raise
    ``NVMLError_FunctionNotFound`` (the unversioned process calls raise
    ``NVMLLibraryMismatchError``, as the real binding's wrapper does).
    """

    gpus: list[FakeGpu] = field(default_factory=list)
    init_error: str | None = None
    memory_v2: bool = True
    hang: threading.Event | None = None
    absent: frozenset[str] = frozenset()
    old_driver: frozenset[str] = frozenset()


def make_module(scenario: Scenario) -> ModuleType:
    """A fresh fake ``pynvml`` module for ``scenario`` (state is per module object)."""
    mod = ModuleType("pynvml")
    calls: Counter[str] = Counter()
    state = {"initialised": False}
    texts = {code: ERROR_TEXT.get(name, f"NVML error {code}")
             for name, code in NVML_ERROR_CODES.items()}

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(value)
            self.value = value

        def __str__(self) -> str:
            return texts[self.value]

    class NVMLLibraryMismatchError(Exception):
        pass

    mod.NVMLError = NVMLError  # type: ignore[attr-defined]
    mod.NVMLLibraryMismatchError = NVMLLibraryMismatchError  # type: ignore[attr-defined]
    classes: dict[int, type[NVMLError]] = {}
    for code_name, code in NVML_ERROR_CODES.items():
        setattr(mod, code_name, code)
        cls_name = error_class_name(code_name)

        def init(self: NVMLError, *_: Any, _code: int = code) -> None:
            NVMLError.__init__(self, _code)

        cls = type(cls_name, (NVMLError,), {"__init__": init})
        setattr(mod, cls_name, cls)
        classes[code] = cls

    def raise_code(code_name: str) -> None:
        code = NVML_ERROR_CODES[code_name]
        raise classes[code](code)

    for const in ("NVML_TEMPERATURE_GPU", "NVML_MEMORY_ERROR_TYPE_UNCORRECTED",
                  "NVML_VOLATILE_ECC", "NVML_DEVICE_MIG_DISABLE", "NVML_DEVICE_MIG_ENABLE"):
        setattr(mod, const, globals()[const])
    mod.nvmlMemory_v2 = NVML_MEMORY_V2  # type: ignore[attr-defined]
    mod.calls = calls  # type: ignore[attr-defined]
    mod.scenario = scenario  # type: ignore[attr-defined]

    def need_init() -> None:
        if not state["initialised"]:
            raise_code("NVML_ERROR_UNINITIALIZED")

    def enter(fn_name: str, handle: Any) -> FakeGpu:
        """Count the call; the device (or MIG unit) behind ``handle``, after the device's
        failure modes and the errors injected for ``fn_name``."""
        calls[fn_name] += 1
        if fn_name in scenario.old_driver:
            if fn_name.endswith("RunningProcesses"):
                raise NVMLLibraryMismatchError("Unversioned function called ...")
            raise_code("NVML_ERROR_FUNCTION_NOT_FOUND")
        need_init()
        gpu: FakeGpu = scenario.gpus[handle.index]
        if gpu.lost:
            raise_code("NVML_ERROR_GPU_IS_LOST")
        if gpu.reset_required:
            raise_code("NVML_ERROR_RESET_REQUIRED")
        target = gpu if handle.mig is None else gpu.mig[handle.mig]
        if fn_name in target.errors:
            raise_code(target.errors[fn_name])
        return target

    def supported(value: Any) -> Any:
        if value is None:
            raise_code("NVML_ERROR_NOT_SUPPORTED")
        return value

    def nvmlInit() -> None:
        calls["nvmlInit"] += 1
        if scenario.init_error:
            raise_code(scenario.init_error)
        state["initialised"] = True

    def nvmlShutdown() -> None:
        calls["nvmlShutdown"] += 1
        need_init()
        state["initialised"] = False

    def nvmlDeviceGetCount() -> int:
        calls["nvmlDeviceGetCount"] += 1
        need_init()
        return len(scenario.gpus)

    def nvmlDeviceGetHandleByIndex(index: int) -> Any:
        calls["nvmlDeviceGetHandleByIndex"] += 1
        need_init()
        if not 0 <= index < len(scenario.gpus):
            raise_code("NVML_ERROR_INVALID_ARGUMENT")
        return SimpleNamespace(index=index, mig=None)

    def nvmlDeviceGetName(handle: Any) -> str | bytes:
        if scenario.hang is not None:
            scenario.hang.wait()
        return enter("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetUUID(handle: Any) -> str:
        uuid: str = supported(enter("nvmlDeviceGetUUID", handle).uuid)
        return uuid

    def nvmlDeviceGetMemoryInfo(handle: Any, version: int | None = None) -> Any:
        if version:
            if not scenario.memory_v2:
                calls["nvmlDeviceGetMemoryInfo_v2"] += 1
                raise_code("NVML_ERROR_FUNCTION_NOT_FOUND")
            gpu = enter("nvmlDeviceGetMemoryInfo_v2", handle)
        else:
            gpu = enter("nvmlDeviceGetMemoryInfo", handle)
        if not gpu.memory_supported:
            raise_code("NVML_ERROR_NOT_SUPPORTED")
        if version:
            return SimpleNamespace(version=version, total=gpu.total, reserved=gpu.reserved,
                                   free=gpu.free, used=gpu.used)
        return SimpleNamespace(total=gpu.total, free=gpu.free, used=gpu.used + gpu.reserved)

    def nvmlDeviceGetUtilizationRates(handle: Any) -> Any:
        gpu = enter("nvmlDeviceGetUtilizationRates", handle)
        return SimpleNamespace(gpu=supported(gpu.utilization), memory=0)

    def nvmlDeviceGetTemperature(handle: Any, sensor: int) -> int:
        gpu = enter("nvmlDeviceGetTemperature", handle)
        if sensor != NVML_TEMPERATURE_GPU:
            raise_code("NVML_ERROR_INVALID_ARGUMENT")
        temperature: int = supported(gpu.temperature)
        return temperature

    def nvmlDeviceGetPowerUsage(handle: Any) -> int:
        power: int = supported(enter("nvmlDeviceGetPowerUsage", handle).power_mw)
        return power

    def nvmlDeviceGetEnforcedPowerLimit(handle: Any) -> int:
        limit: int = supported(enter("nvmlDeviceGetEnforcedPowerLimit", handle).power_limit_mw)
        return limit

    def nvmlDeviceGetCurrentClocksEventReasons(handle: Any) -> int:
        return enter("nvmlDeviceGetCurrentClocksEventReasons", handle).throttle_mask

    def nvmlDeviceGetCurrentClocksThrottleReasons(handle: Any) -> int:
        return enter("nvmlDeviceGetCurrentClocksThrottleReasons", handle).throttle_mask

    def nvmlDeviceGetTotalEccErrors(handle: Any, error_type: int, counter_type: int) -> int:
        gpu = enter("nvmlDeviceGetTotalEccErrors", handle)
        if (error_type, counter_type) != (NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC):
            raise_code("NVML_ERROR_INVALID_ARGUMENT")
        count: int = supported(gpu.ecc_uncorrected)
        return count

    def processes(entries: list[FakeProcess]) -> list[Any]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=used, gpuInstanceId=NOT_AVAILABLE,
                                computeInstanceId=NOT_AVAILABLE) for pid, used in entries]

    def nvmlDeviceGetComputeRunningProcesses(handle: Any) -> list[Any]:
        return processes(enter("nvmlDeviceGetComputeRunningProcesses", handle).compute)

    def nvmlDeviceGetComputeRunningProcesses_v2(handle: Any) -> list[Any]:
        return processes(enter("nvmlDeviceGetComputeRunningProcesses_v2", handle).compute)

    def nvmlDeviceGetGraphicsRunningProcesses(handle: Any) -> list[Any]:
        return processes(enter("nvmlDeviceGetGraphicsRunningProcesses", handle).graphics)

    def nvmlDeviceGetGraphicsRunningProcesses_v2(handle: Any) -> list[Any]:
        return processes(enter("nvmlDeviceGetGraphicsRunningProcesses_v2", handle).graphics)

    def nvmlDeviceGetMigMode(handle: Any) -> list[int]:
        mode: int = supported(enter("nvmlDeviceGetMigMode", handle).mig_mode)
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(handle: Any) -> int:
        gpu = enter("nvmlDeviceGetMaxMigDeviceCount", handle)
        supported(gpu.mig_mode)
        return gpu.max_mig

    def nvmlDeviceGetMigDeviceHandleByIndex(handle: Any, index: int) -> Any:
        gpu = enter("nvmlDeviceGetMigDeviceHandleByIndex", handle)
        if gpu.mig_mode != NVML_DEVICE_MIG_ENABLE or not 0 <= index < gpu.max_mig:
            raise_code("NVML_ERROR_INVALID_ARGUMENT")
        if index not in gpu.mig:
            raise_code("NVML_ERROR_NOT_FOUND")
        return SimpleNamespace(index=handle.index, mig=index)

    functions = (
        nvmlInit, nvmlShutdown, nvmlDeviceGetCount, nvmlDeviceGetHandleByIndex,
        nvmlDeviceGetName, nvmlDeviceGetUUID, nvmlDeviceGetMemoryInfo,
        nvmlDeviceGetUtilizationRates, nvmlDeviceGetTemperature, nvmlDeviceGetPowerUsage,
        nvmlDeviceGetEnforcedPowerLimit, nvmlDeviceGetCurrentClocksEventReasons,
        nvmlDeviceGetCurrentClocksThrottleReasons, nvmlDeviceGetTotalEccErrors,
        nvmlDeviceGetComputeRunningProcesses, nvmlDeviceGetComputeRunningProcesses_v2,
        nvmlDeviceGetGraphicsRunningProcesses, nvmlDeviceGetGraphicsRunningProcesses_v2,
        nvmlDeviceGetMigMode, nvmlDeviceGetMaxMigDeviceCount,
        nvmlDeviceGetMigDeviceHandleByIndex)
    for fn in functions:
        if fn.__name__ not in scenario.absent:
            setattr(mod, fn.__name__, fn)

    def module_getattr(name: str) -> Any:
        # PEP 562: called only for names the module does not define.
        calls[f"lookup:{name}"] += 1
        raise AttributeError(f"module 'pynvml' has no attribute {name!r}")

    mod.__getattr__ = module_getattr  # type: ignore[method-assign]
    return mod


def loader(scenario: Scenario) -> tuple[ModuleType, Any]:
    """A fake module and a ``load`` callable returning it (for ``NvmlSource(load=...)``)."""
    mod = make_module(scenario)
    return mod, lambda: mod


def unavailable_loader() -> ModuleType:
    """A ``load`` callable for a machine without the binding installed."""
    raise ImportError("No module named 'pynvml'")
