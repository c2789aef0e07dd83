"""``DesktopAgent``: a desktop or GPU rig that reports CPU, memory and GPU capacity."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from chiffon_worker.agents.base import BaseAgent
from chiffon_worker.agents.owner_rules import OwnerFacts
from chiffon_worker.config import Config
from chiffon_worker.errors import WorkHandedBack
from chiffon_worker.metrics.battery import Battery
from chiffon_worker.metrics.cpu import CpuMetrics
from chiffon_worker.metrics.gpu import GpuMetrics
from chiffon_worker.metrics.gpu_snapshot import HostMemory, gpu_keys
from chiffon_worker.metrics.memory import MemoryMetrics
from chiffon_worker.metrics.network import mac_for_broker
from chiffon_worker.metrics.owner_activity import OwnerActivity
from chiffon_worker.protocol import WorkRequest, WorkResult

log = logging.getLogger(__name__)

STUB_OUTPUT = "Desktop agent phase 4 (metrics only)"
#: Built-in work type: ``{"work_type": "sleep", "payload": {"seconds": N}}`` holds one pool
#: slot for N seconds (at most ``MAX_SLEEP_SECONDS``) and returns ``{"slept_seconds": N}``.
#: For testing routing, slot occupancy and redelivery end to end.
SLEEP_WORK_TYPE = "sleep"
MAX_SLEEP_SECONDS = 600.0
#: How long the MAC address of the interface reaching the broker is reused (seconds).
MAC_REFRESH_SECONDS = 600.0


class DesktopAgent(BaseAgent):
    """Metric sources are created lazily on first use: constructing an agent probes nothing."""

    def __init__(self, agent_id: str, agent_type: str, config: Config) -> None:
        super().__init__(agent_id, agent_type, config)
        self._cpu: CpuMetrics | None = None
        self._memory: MemoryMetrics | None = None
        self._gpu: GpuMetrics | None = None
        self._owner: OwnerActivity | None = None
        self._battery = Battery()
        self._mac: tuple[float, str | None] | None = None  # (when read, monotonic s; MAC)
        #: the machine is suspending (set by the sleep watch; reported as ``asleep``)
        self.asleep = False

    def _sources(self) -> tuple[CpuMetrics, MemoryMetrics, GpuMetrics]:
        if self._cpu is None or self._memory is None or self._gpu is None:
            root = self.config.sysfs_root
            self._cpu = CpuMetrics(root)
            self._memory = MemoryMetrics(root)
            self._gpu = GpuMetrics(sysfs_root=root,
                                   timeout_s=self.config.gpu_detection_timeout_seconds)
        return self._cpu, self._memory, self._gpu

    def _get_gpu_metrics(self, host: HostMemory | None = None) -> dict[str, Any]:
        """GPU keys: returns within ``gpu_detection_timeout_seconds`` even if a probe hangs.
        ``host``: the memory figures unified-memory GPUs report (default: none)."""
        return gpu_keys(self._sources()[2].sample(), host)

    def _get_resource_metrics(self) -> dict[str, Any]:
        cpu, memory, _ = self._sources()
        metrics = cpu.sample()
        metrics.update(memory.sample())
        host = HostMemory(metrics["memory_total_gb"], metrics["memory_available_gb"])
        metrics.update(self._get_gpu_metrics(host))
        metrics.update(self._owner_keys())
        return metrics

    def _owner_keys(self) -> dict[str, Any]:
        """``owner_idle_seconds``, ``owner_idle_source``, ``on_battery``, ``asleep`` and
        ``mac_address``: each read bounded, each failing alone (to null)."""
        reading = self._owner_activity().read(time.time())
        idle = reading.idle_seconds
        return {"owner_idle_seconds": None if idle is None else round(idle, 1),
                "owner_idle_source": reading.source,
                "on_battery": self._battery.on_battery(),
                "asleep": self.asleep,
                "mac_address": self._mac_address()}

    def owner_facts(self) -> OwnerFacts:
        """What the owner rules decide on, read now (bounded; GPU figures from the probe's
        newest sample)."""
        reading = self._owner_activity().read(time.time())
        gpu = self._get_gpu_metrics()
        return OwnerFacts(reading.idle_seconds, self._battery.on_battery(),
                          gpu["gpu_foreign_memory_gb"], gpu["gpu_temperature_max_c"])

    def _owner_activity(self) -> OwnerActivity:
        if self._owner is None:
            self._owner = OwnerActivity(self.config.dev_root)
        return self._owner

    def _mac_address(self) -> str | None:
        """The MAC of the interface reaching the broker, looked up once per
        ``MAC_REFRESH_SECONDS`` (an interface change shows within that)."""
        now = time.monotonic()
        if self._mac is None or now - self._mac[0] >= MAC_REFRESH_SECONDS:
            self._mac = (now, mac_for_broker(self.config.effective_broker_url))
        return self._mac[1]

    def get_agent_capabilities(self) -> dict[str, Any]:
        return {"gpu_compute": False, "inference": False, "training": False}

    def execute_work(self, request: WorkRequest,
                     handed_back: threading.Event | None = None) -> WorkResult:
        """Stub: logs the work type and succeeds; real execution arrives in a later phase.

        The one built-in work type, ``sleep``, holds the slot for ``payload.seconds``; it
        stops with WorkHandedBack when ``handed_back`` is set meanwhile."""
        started = time.perf_counter()
        if request.work_type == SLEEP_WORK_TYPE:
            return self._sleep(request, started, handed_back or threading.Event())
        log.info("work %s of type %s received (stub: metrics-only agent)",
                 request.work_id, request.work_type)
        return WorkResult.success(request, STUB_OUTPUT, self.agent_id,
                                  time.perf_counter() - started)

    def _sleep(self, request: WorkRequest, started: float,
               handed_back: threading.Event) -> WorkResult:
        payload = request.payload
        seconds = payload.get("seconds") if isinstance(payload, dict) else None
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
                or not 0 <= seconds <= MAX_SLEEP_SECONDS:
            return WorkResult.failure(
                request.work_id, f"sleep: payload.seconds must be a number from 0 to "
                f"{MAX_SLEEP_SECONDS:g}, got {seconds!r}", self.agent_id,
                time.perf_counter() - started)
        log.info("work %s: sleeping %g s", request.work_id, seconds)
        if handed_back.wait(seconds):
            raise WorkHandedBack(f"sleep stopped after {time.perf_counter() - started:.1f} s")
        return WorkResult.success(request, {"slept_seconds": seconds}, self.agent_id,
                                  time.perf_counter() - started)

    def close(self) -> None:
        if self._gpu is not None:
            self._gpu.close()
        if self._owner is not None:
            self._owner.close()
