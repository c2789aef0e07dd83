"""Prometheus ``/metrics`` for the orchestrator: per-agent gauges and consumer counters.

A custom collector reads the registry on every scrape (no state of its own to go
stale) and the consumer's :class:`~.ingest_counters.IngestStats`. Base units, as
Prometheus expects: bytes (the snapshot's GiB times 2^30) and seconds.

Per agent (labels ``agent_id``, ``hostname``, ``pool``): ``chiffon_agent_up``,
``chiffon_agent_heartbeat_age_seconds``, ``chiffon_agent_restarts_total``,
``chiffon_agent_missed_heartbeats_total``, and one gauge per snapshot field declared with
a ``Gauge`` in :mod:`chiffon_worker.snapshot` (``chiffon_agent_cpu_load_1min``,
``chiffon_agent_cpu_cores_physical``, ``chiffon_agent_cpu_cores_available``,
``chiffon_agent_memory_available_bytes``, ``chiffon_agent_memory_total_bytes``,
``chiffon_agent_gpu_vram_total_bytes``, ``chiffon_agent_gpu_vram_available_bytes``,
``chiffon_agent_gpu_power_draw_watts``, ``chiffon_agent_gpu_power_limit_watts``,
``chiffon_agent_gpu_processes``, ``chiffon_agent_gpu_foreign_processes``,
``chiffon_agent_gpu_foreign_memory_bytes``; a value that is unknown or that an older
agent does not send is left out), and ``chiffon_agent_gpu_health`` (``state``: 1 for the
worst health of its GPUs).

Consumer: ``chiffon_heartbeats_accepted_total``, ``chiffon_heartbeats_rejected_total``
(``reason``), ``chiffon_heartbeats_ignored_total`` (``reason``),
``chiffon_agent_restarts_detected_total``, ``chiffon_heartbeat_gaps_total``,
``chiffon_heartbeats_missed_total``, ``chiffon_heartbeats_clock_skewed_total``,
``chiffon_registry_batches_total``, ``chiffon_registry_write_seconds_total``,
``chiffon_registry_write_errors_total``, ``chiffon_broker_connection_losses_total``,
and ``chiffon_registry_up`` (0 when the registry could not be read for this scrape).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server

from chiffon_worker.errors import ChiffonError, RegistryError
from chiffon_worker.orchestrator.decoding import REJECT_REASONS
from chiffon_worker.orchestrator.ingest_counters import IngestStats
from chiffon_worker.orchestrator.liveness import LIVENESS_STATES
from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.snapshot import GAUGE_FIELDS, GPU_HEALTHS

log = logging.getLogger(__name__)

_LABELS = ["agent_id", "hostname", "pool"]

#: (snapshot key, metric name, help, scale to the base unit) of the per-agent gauges
_AGENT_GAUGES: tuple[tuple[str, str, str, float], ...] = tuple(
    (f.name, f.gauge.name, f.gauge.help, f.gauge.scale) for f in GAUGE_FIELDS
    if f.gauge is not None)


class OrchestratorCollector:
    """Collects per-agent gauges from ``registry`` and counters from ``stats`` per scrape."""

    def __init__(self, registry: Registry, stats: IngestStats | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.stats = stats
        self.clock = clock

    def describe(self) -> list[Metric]:
        """Nothing up front: the registry is read only when scraped."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families for one scrape."""
        yield from self._agent_metrics()
        if self.stats is not None:
            yield from _stats_metrics(self.stats.copy())

    def _agent_metrics(self) -> Iterator[Metric]:
        registry_up = GaugeMetricFamily("chiffon_registry_up",
                                        "1 if the registry could be read for this scrape")
        try:
            records = self.registry.agents()
        except RegistryError as exc:
            log.warning("scrape: %s", exc)
            registry_up.add_metric([], 0)
            yield registry_up
            return
        registry_up.add_metric([], 1)
        yield registry_up
        now = self.clock()
        up = GaugeMetricFamily("chiffon_agent_up", "1 while the agent is alive (online, or "
                               "conflict: a sign of life within its window), else 0",
                               labels=_LABELS)
        liveness = GaugeMetricFamily("chiffon_agent_liveness", "1 for the agent's liveness "
                                     "state (online, stopped, lost, conflict), 0 for the "
                                     "others",
                                     labels=[*_LABELS, "state"])
        age = GaugeMetricFamily("chiffon_agent_heartbeat_age_seconds",
                                "seconds since the newest heartbeat was received",
                                labels=_LABELS)
        gpu_health = GaugeMetricFamily("chiffon_agent_gpu_health", "1 for the worst health "
                                       "of the agent's GPUs (ok, degraded, unhealthy, none), "
                                       "0 for the others", labels=[*_LABELS, "state"])
        gauges = [GaugeMetricFamily(name, text, labels=_LABELS) for _, name, text, _ in
                  _AGENT_GAUGES]
        restarts = CounterMetricFamily("chiffon_agent_restarts", "agent restarts seen",
                                       labels=_LABELS)
        missed = CounterMetricFamily("chiffon_agent_missed_heartbeats",
                                     "heartbeat sequence numbers never received",
                                     labels=_LABELS)
        for record in records:
            labels = [record.agent_id, record.hostname, record.pool]
            current = record.liveness(now)
            up.add_metric(labels, 1.0 if current in ("online", "conflict") else 0.0)
            for state in LIVENESS_STATES:
                liveness.add_metric([*labels, state], 1.0 if current == state else 0.0)
            age.add_metric(labels, record.age_seconds(now))
            for family, (key, _, _, scale) in zip(gauges, _AGENT_GAUGES, strict=True):
                value = record.metrics.get(key)
                if value is not None:  # unknown, or not reported by an older agent
                    family.add_metric(labels, float(value) * scale)
            health = record.metrics.get("gpu_health")
            if health is not None:
                for level in GPU_HEALTHS:
                    gpu_health.add_metric([*labels, level], 1.0 if health == level else 0.0)
            restarts.add_metric(labels, record.restarts)
            missed.add_metric(labels, record.missed)
        yield up
        yield liveness
        yield age
        yield gpu_health
        yield from gauges
        yield restarts
        yield missed


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=value)


def _stats_metrics(stats: IngestStats) -> Iterator[Metric]:
    yield _counter("chiffon_heartbeats_accepted", "heartbeats recorded", stats.accepted)
    rejected = CounterMetricFamily("chiffon_heartbeats_rejected",
                                   "messages dropped as invalid, unsigned, forged or replayed",
                                   labels=["reason"])
    for reason in sorted(set(REJECT_REASONS) | set(stats.rejected)):
        rejected.add_metric([reason], stats.rejected.get(reason, 0))
    yield rejected
    ignored = CounterMetricFamily("chiffon_heartbeats_ignored",
                                  "valid heartbeats not recorded (duplicate, out of order, "
                                  "superseded boot, expired, redelivered)", labels=["reason"])
    for reason, count in sorted(stats.ignored.items()):
        ignored.add_metric([reason], count)
    yield ignored
    yield _counter("chiffon_agent_restarts_detected", "agent restarts detected", stats.restarts)
    yield _counter("chiffon_heartbeat_gaps", "sequence gaps detected", stats.gaps)
    yield _counter("chiffon_agent_id_conflicts", "heartbeats from a second live process "
                   "claiming an agent's id", stats.conflicts)
    yield _counter("chiffon_heartbeats_missed", "sequence numbers missed in gaps",
                   stats.missed)
    yield _counter("chiffon_heartbeats_clock_skewed",
                   "heartbeats whose collected_at was off the receipt time beyond the "
                   "threshold", stats.clock_skewed)
    yield _counter("chiffon_registry_batches", "registry write transactions", stats.batches)
    yield _counter("chiffon_registry_write_seconds", "seconds spent in registry writes",
                   stats.write_seconds)
    yield _counter("chiffon_registry_write_errors", "failed registry writes",
                   stats.write_errors)
    yield _counter("chiffon_broker_connection_losses", "times the broker connection was lost",
                   stats.connection_losses)


class MetricsServer:
    """``/metrics`` over HTTP in a daemon thread; ``port`` 0 picks a free port."""

    def __init__(self, collector: OrchestratorCollector, port: int,
                 addr: str = "0.0.0.0") -> None:
        self.collector_registry = CollectorRegistry(auto_describe=False)
        self.collector_registry.register(collector)
        try:
            self._server, self._thread = start_http_server(
                port, addr=addr, registry=self.collector_registry)
        except OSError as exc:
            raise ChiffonError(f"cannot serve /metrics on {addr}:{port}: "
                                f"{exc.strerror or exc}") from None
        self.port: int = self._server.server_port
        log.info("serving /metrics on %s:%d", addr, self.port)

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

