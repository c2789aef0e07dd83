"""Who spent the machine's CPU during a measured run: the consumer, RabbitMQ, PostgreSQL.

On a machine whose cores are all busy, a consumer's rate is set by the CPU it needs per
message, and a ratio of rates is close to the inverse ratio of those CPU costs. A rate
alone cannot tell that apart from a consumer that waits (on the broker, on the database),
so ``bench/ingest.py`` measures, around each timed drain:

- ``consumer``: this process's CPU time (every thread), per message;
- ``rabbitmq``: the CPU time of the RabbitMQ server processes (``beam.smp``), per message;
- ``postgresql``: that of every PostgreSQL server process (``postgres``), per message;
- ``machine_busy_percent``: the share of all cores' time not idle over the run (100: no
  core was ever idle), ``steal_percent`` the share the hypervisor gave to other machines
  (a shared host), and the core count.

Process CPU times come from ``/proc`` through psutil. A server process that starts during
the run counts from zero; one that ends during it loses what it spent (both rare: the
broker and the database run before the drain starts).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

#: Process names of the servers whose CPU is counted, by what the result calls them.
SERVERS = {"rabbitmq": ("beam.smp",), "postgresql": ("postgres",)}
#: The kinds of the machine's CPU time that add up to all of it (Linux counts guest
#: time inside user time, so it is left out).
_MACHINE_TIMES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_model() -> str:
    """The processor's model and cache as ``/proc/cpuinfo`` names them (machines of one
    kind differ from day to day; "" where not told)."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return ""
    found: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        found.setdefault(key.strip(), value.strip())
    return ", ".join(found[key] for key in ("model name", "cache size") if found.get(key))


def _server_times() -> dict[str, dict[int, float]]:
    """Per server kind, each of its processes' user + system CPU seconds by pid."""
    found: dict[str, dict[int, float]] = {kind: {} for kind in SERVERS}
    for proc in psutil.process_iter(["name", "cpu_times"]):
        name, times = proc.info["name"], proc.info["cpu_times"]
        if times is None:  # gone, or not ours to read
            continue
        for kind, names in SERVERS.items():
            if name in names:
                found[kind][proc.pid] = times.user + times.system
    return found


def _spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two readings (a process new since ``before`` from 0)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


@dataclass
class CpuUse:
    """What :func:`measure_cpu` found (seconds of CPU, and of wall time)."""

    wall_seconds: float = 0.0
    consumer_seconds: float = 0.0
    server_seconds: dict[str, float] = field(default_factory=dict)
    busy_fraction: float = 0.0
    steal_fraction: float = 0.0
    cores: int = 0

    def per_message(self, messages: int) -> dict[str, float]:
        """CPU µs per message of the consumer and of each server, and how busy the
        machine was (percent of all cores' time)."""
        row = {"consumer_cpu_us_per_message": round(self.consumer_seconds / messages * 1e6, 1)}
        for kind, seconds in self.server_seconds.items():
            row[f"{kind}_cpu_us_per_message"] = round(seconds / messages * 1e6, 1)
        row["machine_busy_percent"] = round(self.busy_fraction * 100, 1)
        row["steal_percent"] = round(self.steal_fraction * 100, 1)
        row["cores"] = self.cores
        return row


@contextmanager
def measure_cpu() -> Iterator[CpuUse]:
    """Measure the block: the result is filled in when the block ends."""
    use = CpuUse(cores=psutil.cpu_count() or 1)
    servers = _server_times()
    machine = psutil.cpu_times()
    consumer = time.process_time()
    wall = time.perf_counter()
    try:
        yield use
    finally:
        use.wall_seconds = time.perf_counter() - wall
        use.consumer_seconds = time.process_time() - consumer
        after = psutil.cpu_times()
        spent = {name: getattr(after, name, 0.0) - getattr(machine, name, 0.0)
                 for name in _MACHINE_TIMES}
        total = sum(spent.values())
        if total > 0:
            use.busy_fraction = 1.0 - (spent["idle"] + spent["iowait"]) / total
            use.steal_fraction = spent["steal"] / total
        later = _server_times()
        use.server_seconds = {kind: _spent(servers[kind], later[kind]) for kind in SERVERS}
