"""A stand-in for the ``pynvml`` module (nvidia-ml-py), configurable per scenario.

It mirrors the real binding's surface that chiffon uses: the ``NVML_ERROR_*`` codes and
one ``NVMLError_<Name>`` subclass of ``NVMLError`` per code (same names, same values),
``nvmlMemory_v2``, ``NVML_TEMPERATURE_GPU``, and the functions ``nvmlInit``,
``nvmlShutdown``, ``nvmlDeviceGetCount``, ``nvmlDeviceGetHandleByIndex``,
``nvmlDeviceGetName``, ``nvmlDeviceGetMemoryInfo(handle, version=None)``,
``nvmlDeviceGetUtilizationRates``, ``nvmlDeviceGetTemperature``. Every call is counted in
``module.calls`` so tests can assert what was (not) called.

Numbers come from gpu-samples.md: the v2 memory sample of a 24 GiB card is
``RTX4090_V2`` below.
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
NVML_TEMPERATURE_GPU = 0
NVML_MEMORY_V2 = 0x02000028


def error_class_name(code_name: str) -> str:
    """``NVML_ERROR_GPU_IS_LOST`` -> ``NVMLError_GpuIsLost`` (the binding's rule)."""
    return "NVMLError_" + string.capwords(
        code_name.replace("NVML_ERROR_", ""), "_").replace("_", "")


@dataclass
class FakeGpu:
    """One device. Memory in bytes; ``None`` utilisation/temperature = NotSupported."""

    name: str | bytes
    total: int
    free: int
    used: int
    reserved: int = 0
    utilization: int | None = 0
    temperature: int | None = 40
    lost: bool = False  # every per-device call raises NVMLError_GpuIsLost
    memory_supported: bool = True  # False: memory queries raise NotSupported (GB10-like)


# gpu-samples.md, "v2 sample for a 24 GiB card" (bytes).
RTX4090_V2 = FakeGpu(name="NVIDIA GeForce RTX 4090", total=25757220864, reserved=398458880,
                     free=24946671616, used=412090368, utilization=2, temperature=38)
# A second 24 GiB card (nvidia-smi sample: 24576 MiB total, 24245 MiB free).
RTX3090 = FakeGpu(name="NVIDIA GeForce RTX 3090", total=24576 * 2**20, free=24245 * 2**20,
                  used=(24576 - 24245) * 2**20, utilization=0, temperature=31)
# MIG-enabled A100 (utilisation not supported under MIG).
A100_MIG = FakeGpu(name="NVIDIA A100-SXM4-80GB", total=81920 * 2**20, free=45383 * 2**20,
                   used=(81920 - 45383) * 2**20, utilization=None, temperature=33)


@dataclass
class Scenario:
    """What the fake machine looks like.

    ``init_error``: an ``NVML_ERROR_*`` name raised by ``nvmlInit``.
    ``memory_v2``: False makes the versioned memory call raise FunctionNotFound (old driver).
    ``hang``: if set, every ``nvmlDeviceGetName`` blocks until the event is set.
    """

    gpus: list[FakeGpu] = field(default_factory=list)
    init_error: str | None = None
    memory_v2: bool = True
    hang: threading.Event | None = None


def make_module(scenario: Scenario) -> ModuleType:
    """A fresh fake ``pynvml`` module for ``scenario`` (state is per module object)."""
    mod = ModuleType("pynvml")
    calls: Counter[str] = Counter()
    state = {"initialised": False}

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(value)
            self.value = value

        def __str__(self) -> str:
            return f"NVML error {self.value}"

    mod.NVMLError = NVMLError  # type: ignore[attr-defined]
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
        raise classes[NVML_ERROR_CODES[code_name]]()

    mod.NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU  # type: ignore[attr-defined]
    mod.nvmlMemory_v2 = NVML_MEMORY_V2  # type: ignore[attr-defined]
    mod.calls = calls  # type: ignore[attr-defined]
    mod.scenario = scenario  # type: ignore[attr-defined]

    def need_init() -> None:
        if not state["initialised"]:
            raise_code("NVML_ERROR_UNINITIALIZED")

    def gpu_of(handle: Any) -> FakeGpu:
        need_init()
        gpu: FakeGpu = scenario.gpus[handle.index]
        if gpu.lost:
            raise_code("NVML_ERROR_GPU_IS_LOST")
        return gpu

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
        return SimpleNamespace(index=index)

    def nvmlDeviceGetName(handle: Any) -> str | bytes:
        calls["nvmlDeviceGetName"] += 1
        if scenario.hang is not None:
            scenario.hang.wait()
        return gpu_of(handle).name

    def nvmlDeviceGetMemoryInfo(handle: Any, version: int | None = None) -> Any:
        if version:
            calls["nvmlDeviceGetMemoryInfo_v2"] += 1
            if not scenario.memory_v2:
                raise_code("NVML_ERROR_FUNCTION_NOT_FOUND")
        else:
            calls["nvmlDeviceGetMemoryInfo"] += 1
        gpu = gpu_of(handle)
        if not gpu.memory_supported:
            raise_code("NVML_ERROR_NOT_SUPPORTED")
        if version:
            return SimpleNamespace(version=version, total=gpu.total, reserved=gpu.reserved,
                                   free=gpu.free, used=gpu.used)
        return SimpleNamespace(total=gpu.total, free=gpu.free, used=gpu.used + gpu.reserved)

    def nvmlDeviceGetUtilizationRates(handle: Any) -> Any:
        calls["nvmlDeviceGetUtilizationRates"] += 1
        gpu = gpu_of(handle)
        if gpu.utilization is None:
            raise_code("NVML_ERROR_NOT_SUPPORTED")
        return SimpleNamespace(gpu=gpu.utilization, memory=0)

    def nvmlDeviceGetTemperature(handle: Any, sensor: int) -> int:
        calls["nvmlDeviceGetTemperature"] += 1
        gpu = gpu_of(handle)
        if sensor != NVML_TEMPERATURE_GPU:
            raise_code("NVML_ERROR_INVALID_ARGUMENT")
        if gpu.temperature is None:
            raise_code("NVML_ERROR_NOT_SUPPORTED")
        return gpu.temperature

    for fn in (nvmlInit, nvmlShutdown, nvmlDeviceGetCount, nvmlDeviceGetHandleByIndex,
               nvmlDeviceGetName, nvmlDeviceGetMemoryInfo, nvmlDeviceGetUtilizationRates,
               nvmlDeviceGetTemperature):
        setattr(mod, fn.__name__, fn)
    return mod


def loader(scenario: Scenario) -> tuple[ModuleType, Any]:
    """A fake module and a ``load`` callable returning it (for ``NvmlSource(load=...)``)."""
    mod = make_module(scenario)
    return mod, lambda: mod


def unavailable_loader() -> ModuleType:
    """A ``load`` callable for a machine without the binding installed."""
    raise ImportError("No module named 'pynvml'")
