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
``chiffon_heartbeats_missed_total``, ``chiffon_heartbeats_late_total``,
``chiffon_heartbeats_clock_skewed_total``,
``chiffon_registry_batches_total``, ``chiffon_registry_write_seconds_total``,
``chiffon_registry_write_errors_total``, ``chiffon_broker_connection_losses_total``,
and ``chiffon_registry_up`` (0 when the registry could not be read for this scrape).

Scale: 10,000 agents make a 19 MB page of 150,000 samples. prometheus_client builds an
object per sample and formats each (1.5-2.5 s a scrape, and 0.4 s more to gzip it at level
9); :class:`MetricsServer` instead writes the registry and per-agent families directly
(:meth:`OrchestratorCollector.page`: the same bytes, held equal to prometheus_client's
output by the tests) and gzips at :data:`GZIP_LEVEL`. Measured in ``bench/registry.py``.

The same server answers ``/`` with the fleet page and ``/fleet.json`` with its data
(:mod:`.fleet_page`, :mod:`.fleet_view`).
"""

from __future__ import annotations

import gzip
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import (
    ThreadingWSGIServer,
    choose_encoder,
    gzip_accepted,
    make_wsgi_app,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from chiffon_worker.errors import ChiffonError, RegistryError
from chiffon_worker.orchestrator.decoding import REJECT_REASONS
from chiffon_worker.orchestrator.fleet_page import fleet_page
from chiffon_worker.orchestrator.fleet_view import FleetView
from chiffon_worker.orchestrator.ingest_counters import IngestStats
from chiffon_worker.orchestrator.liveness import LIVENESS_STATES, Liveness
from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.snapshot import GAUGE_FIELDS, GPU_HEALTHS

log = logging.getLogger(__name__)

_LABELS = ["agent_id", "hostname", "pool"]

#: (snapshot key, metric name, help, scale to the base unit) of the per-agent gauges
_AGENT_GAUGES: tuple[tuple[str, str, str, float], ...] = tuple(
    (f.name, f.gauge.name, f.gauge.help, f.gauge.scale) for f in GAUGE_FIELDS
    if f.gauge is not None)
#: Liveness states in which an agent counts as up.
_ALIVE = ("online", "conflict")
#: gzip level of a compressed page: 19 MB of text (10,000 agents) took 0.40 s at
#: prometheus_client's level 9 and 0.06 s at 3, for 18% more bytes.
GZIP_LEVEL = 3
#: The paths of the fleet page and its data (GET).
_FLEET_PATHS = frozenset({"/", "/fleet.json"})
#: A sample value as prometheus_client writes it (Go's float format; its function is untyped).
_go_float: Callable[[float], str] = floatToGoString


@dataclass(frozen=True)
class _Family:
    """One metric family: its name (a counter's without ``_total``), help and type."""

    name: str
    help: str
    kind: str  # "gauge" or "counter"
    column: str = ""  # the column of chiffon_agents a counter counts

    @property
    def sample(self) -> str:
        """The name its samples carry."""
        return self.name + "_total" if self.kind == "counter" else self.name

    def header(self, openmetrics: bool) -> str:
        """Its ``# HELP`` and ``# TYPE`` lines as prometheus_client writes them: in the
        text format a counter is named with ``_total``; OpenMetrics also escapes quotes."""
        text = self.help.replace("\\", r"\\").replace("\n", r"\n")
        if openmetrics:
            text = text.replace('"', r'\"')
            return f"# HELP {self.name} {text}\n# TYPE {self.name} {self.kind}\n"
        return f"# HELP {self.sample} {text}\n# TYPE {self.sample} {self.kind}\n"

    def metric(self, labels: Sequence[str] = ()) -> GaugeMetricFamily | CounterMetricFamily:
        """An empty prometheus_client family of it with ``labels``."""
        kind = GaugeMetricFamily if self.kind == "gauge" else CounterMetricFamily
        return kind(self.name, self.help, labels=list(labels))


_REGISTRY_UP = _Family("chiffon_registry_up", "1 if the registry could be read for this scrape",
                       "gauge")
_UP = _Family("chiffon_agent_up", "1 while the agent is alive (online, or conflict: a sign of "
              "life within its window), else 0", "gauge")
_LIVENESS = _Family("chiffon_agent_liveness", "1 for the agent's liveness state (online, "
                    "stopped, lost, conflict), 0 for the others", "gauge")
_AGE = _Family("chiffon_agent_heartbeat_age_seconds",
               "seconds since the newest heartbeat was received", "gauge")
_GPU_HEALTH = _Family("chiffon_agent_gpu_health", "1 for the worst health of the agent's GPUs "
                      "(ok, degraded, unhealthy, none), 0 for the others", "gauge")
_GAUGES = tuple(_Family(name, text, "gauge") for _, name, text, _ in _AGENT_GAUGES)
_RESTARTS = _Family("chiffon_agent_restarts", "agent restarts seen", "counter", "restarts")
_MISSED = _Family("chiffon_agent_missed_heartbeats", "heartbeat sequence numbers never received",
                  "counter", "missed")
#: The columns of ``chiffon_agents`` the page reads (liveness comes with them).
_COLUMNS: tuple[str, ...] = ("agent_id", "hostname", "pool", "last_seen", "restarts", "missed",
                             "gpu_health", *(key for key, _, _, _ in _AGENT_GAUGES))


class OrchestratorCollector:
    """Collects per-agent gauges from ``registry`` and counters from ``stats`` per scrape.

    :meth:`page` writes the whole page (what :class:`MetricsServer` serves); :meth:`collect`
    yields the same as prometheus_client metric families, from the agents' records (the
    slower form: what prometheus_client's own exposition reads, for the requests
    :class:`MetricsServer` passes on to it, and the reference the page is tested against)."""

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

    def page(self, encoder: Callable[[Collector], bytes], openmetrics: bool) -> bytes:
        """One scrape's page: what ``encoder`` (prometheus_client's ``generate_latest`` of
        the text format, or OpenMetrics' when ``openmetrics``, as ``choose_encoder`` picks
        them) writes for :meth:`collect`, the same bytes, but the registry and per-agent
        families written here directly from the columns they need
        (:meth:`Registry.agent_values`): at 10,000 agents (150,000 samples) building
        records and prometheus_client's sample objects took 1.5-2.5 s."""
        now = self.clock()
        try:
            agents = self.registry.agent_values(_COLUMNS, now)
        except RegistryError as exc:
            log.warning("scrape: %s", exc)
            text = _REGISTRY_UP.header(openmetrics) + f"{_REGISTRY_UP.sample} 0.0\n"
        else:
            text = (_REGISTRY_UP.header(openmetrics) + f"{_REGISTRY_UP.sample} 1.0\n"
                    + _agent_text(agents, now, openmetrics))
        # the consumer's counters (few) through prometheus_client: its OpenMetrics ends
        # the page with "# EOF"
        stats = _Families(() if self.stats is None else _stats_metrics(self.stats.copy()))
        return text.encode() + encoder(stats)

    def _agent_metrics(self) -> Iterator[Metric]:
        registry_up = _REGISTRY_UP.metric()
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
        up = _UP.metric(_LABELS)
        liveness = _LIVENESS.metric([*_LABELS, "state"])
        age = _AGE.metric(_LABELS)
        gpu_health = _GPU_HEALTH.metric([*_LABELS, "state"])
        gauges = [family.metric(_LABELS) for family in _GAUGES]
        restarts = _RESTARTS.metric(_LABELS)
        missed = _MISSED.metric(_LABELS)
        for record in records:
            labels = [record.agent_id, record.hostname, record.pool]
            current = record.liveness(now)
            up.add_metric(labels, 1.0 if current in _ALIVE else 0.0)
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


class _Families:
    """Metric families to hand to a prometheus_client encoder (a Collector)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        """The families."""
        return self.families


def _label_value(value: str) -> str:
    """A label value escaped as in the exposition formats (backslash, newline, quote)."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def _agent_text(agents: Sequence[tuple[Liveness, Sequence[Any]]], now: float,
                openmetrics: bool) -> str:
    """The per-agent families of :meth:`OrchestratorCollector.collect` for ``agents``
    (liveness and the :data:`_COLUMNS` of each) at ``now`` (unix seconds), as
    prometheus_client's encoders write them: families in the same order, samples in agent
    order, labels sorted by name (``agent_id``, ``hostname``, ``pool``, ``state``),
    values as its ``floatToGoString`` writes them. Each agent's label set is escaped once
    for its 16 families; one-hot families (liveness, GPU health) are one template per
    state."""
    labels = [f'agent_id="{_label_value(v[0])}",hostname="{_label_value(v[1])}",'
              f'pool="{_label_value(v[2])}"' for _, v in agents]
    out = [_UP.header(openmetrics)]
    up = _UP.sample
    out += [f"{up}{{{lab}}} {'1.0' if cur in _ALIVE else '0.0'}\n"
            for lab, (cur, _) in zip(labels, agents, strict=True)]
    out.append(_LIVENESS.header(openmetrics))
    liveness = _one_hot(_LIVENESS.sample, LIVENESS_STATES)
    out += [liveness[cur].replace(_LABELS_HERE, lab)
            for lab, (cur, _) in zip(labels, agents, strict=True)]
    out.append(_AGE.header(openmetrics))
    age, last_seen = _AGE.sample, _COLUMNS.index("last_seen")
    out += [f"{age}{{{lab}}} {_value_text(max(0.0, now - v[last_seen]))}\n"
            for lab, (_, v) in zip(labels, agents, strict=True)]
    out.append(_GPU_HEALTH.header(openmetrics))
    health, gpu_health = _one_hot(_GPU_HEALTH.sample, GPU_HEALTHS), _COLUMNS.index("gpu_health")
    for lab, (_, v) in zip(labels, agents, strict=True):
        level = v[gpu_health]
        if level is not None:
            out.append(health.get(level, health[None]).replace(_LABELS_HERE, lab))
    for family, (key, _, _, scale) in zip(_GAUGES, _AGENT_GAUGES, strict=True):
        out.append(family.header(openmetrics))
        name, at = family.sample, _COLUMNS.index(key)
        for lab, (_, v) in zip(labels, agents, strict=True):
            value = v[at]
            if value is not None:  # unknown, or not reported by an older agent
                out.append(f"{name}{{{lab}}} {_value_text(float(value) * scale)}\n")
    for family in (_RESTARTS, _MISSED):
        out.append(family.header(openmetrics))
        name, at = family.sample, _COLUMNS.index(family.column)
        out += [f"{name}{{{lab}}} {_value_text(v[at])}\n"
                for lab, (_, v) in zip(labels, agents, strict=True)]
    return "".join(out)


#: Where a one-hot template takes an agent's label set.
_LABELS_HERE = "\0"


def _one_hot(name: str, states: Sequence[str]) -> dict[str | None, str]:
    """For each of ``states``: the samples of the family ``name`` (label ``state``) with
    that state 1 and the others 0, the agent's labels left as :data:`_LABELS_HERE`; for
    None every sample 0 (how ``collect`` writes a state it does not know)."""
    def lines(current: str | None) -> str:
        return "".join(f'{name}{{{_LABELS_HERE},state="{state}"}} '
                       f'{"1.0" if state == current else "0.0"}\n' for state in states)

    return {state: lines(state) for state in (*states, None)}


def _value_text(value: float) -> str:
    """A sample's value as prometheus_client's ``floatToGoString`` writes it (Go's format:
    large positive numbers with an exponent, ``+Inf``, ``NaN``), without its cost for
    finite numbers (it was a third of the page's time); a test holds the two equal."""
    text = repr(float(value))
    dot = text.find(".")
    if dot > 6 and value > 0:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    if "n" in text:  # inf, nan
        return _go_float(value)
    return text


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
    yield _counter("chiffon_heartbeats_late", "heartbeats that arrived after a newer one of "
                   "their agent and took their number back from the missed",
                   stats.late)
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
    """``/metrics`` over HTTP in a daemon thread, and the fleet page beside it; ``port`` 0
    picks a free port.

    ``GET /`` is the fleet page (:mod:`.fleet_page`) and ``GET /fleet.json`` its data
    (``fleet``, by default a :class:`~.fleet_view.FleetView` of the collector's registry;
    503 with ``{"error": ...}`` when the registry cannot be read). Every other request is
    served as prometheus_client's ``start_http_server`` does (any path; the text format or
    OpenMetrics by the Accept header; gzip when accepted; OPTIONS, 405 for other methods,
    an empty ``/favicon.ico``), but a GET writes the page with
    :meth:`OrchestratorCollector.page` and compresses it at :data:`GZIP_LEVEL`; requests
    naming families (``name[]``) and the other methods are answered by prometheus_client
    itself."""

    def __init__(self, collector: OrchestratorCollector, port: int,
                 addr: str = "0.0.0.0", *, fleet: FleetView | None = None) -> None:
        self.collector = collector
        self.fleet = fleet or FleetView(collector.registry, clock=collector.clock)
        self.collector_registry = CollectorRegistry(auto_describe=False)
        self.collector_registry.register(collector)
        self._fallback = make_wsgi_app(self.collector_registry)

        class Server(ThreadingWSGIServer):
            """The threading WSGI server of prometheus_client, for this address's family."""

        try:
            family, host = _address_family(addr, port)
            Server.address_family = family
            self._server = make_server(host, port, self._app, Server,
                                       handler_class=_QuietHandler)
        except OSError as exc:
            raise ChiffonError(f"cannot serve /metrics on {addr}:{port}: "
                                f"{exc.strerror or exc}") from None
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="chiffon-metrics", daemon=True)
        self._thread.start()
        self.port: int = self._server.server_port
        log.info("serving /metrics on %s:%d", addr, self.port)

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]
             ) -> list[bytes]:
        """The WSGI application: GET of the fleet page or its data answers those, another
        GET writes the metrics page, the rest goes to prometheus_client."""
        if environ["REQUEST_METHOD"] == "GET" and environ["PATH_INFO"] in _FLEET_PATHS:
            return self._fleet_answer(environ, start_response)
        if (environ["REQUEST_METHOD"] != "GET" or environ["PATH_INFO"] == "/favicon.ico"
                or "name[]" in parse_qs(environ.get("QUERY_STRING", ""))):
            output: list[bytes] = self._fallback(environ, start_response)
            return output
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        page = self.collector.page(
            encoder, content_type.startswith("application/openmetrics-text"))
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            page = gzip.compress(page, compresslevel=GZIP_LEVEL)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [page]

    def _fleet_answer(self, environ: dict[str, Any], start_response: Callable[..., Any]
                      ) -> list[bytes]:
        """The fleet page (``/``) or its JSON (``/fleet.json``, gzipped when accepted)."""
        headers = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]
        if environ["PATH_INFO"] == "/":
            page = fleet_page()
            start_response("200 OK", [
                ("Content-Type", "text/html; charset=utf-8"),
                ("Content-Security-Policy", page.content_security_policy), *headers])
            return [page.body]
        status = "200 OK"
        try:
            body = self.fleet.json_bytes()
        except RegistryError as exc:
            log.warning("fleet page: %s", exc)
            status, body = "503 Service Unavailable", json.dumps({"error": str(exc)}).encode()
        headers.append(("Content-Type", "application/json"))
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            body = gzip.compress(body, compresslevel=GZIP_LEVEL)
            headers.append(("Content-Encoding", "gzip"))
        start_response(status, headers)
        return [body]

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _QuietHandler(WSGIRequestHandler):
    """Logs no request (as prometheus_client's handler)."""

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing."""


def _address_family(addr: str, port: int) -> tuple[socket.AddressFamily, str]:
    """The address family and host to bind ``addr`` with (IPv6 addresses too), as
    prometheus_client picks them."""
    infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return family, str(sockaddr[0])
