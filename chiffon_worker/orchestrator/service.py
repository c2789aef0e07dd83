"""``chiffon orchestrator``: consumer + registry + worker events + drains + ``/metrics`` in
one process.

The consumer runs in the calling thread; the metrics server in a daemon thread. Several
orchestrators may run on one PostgreSQL registry: every one of them consumes the shared
heartbeat queue (the registry's ingest turn orders their writes), and the one holding
the lead (:mod:`.leadership`) also follows the agents' events and re-sends drains; the
others take the lead when it goes. One orchestrator per SQLite registry.
SIGTERM and SIGINT ask the consumer to stop: it commits and acks what it holds, closes
the broker connection, and :func:`run_orchestrator` returns. A broker that refuses the
login, to the consumer or to the worker-event listener, stops everything too:
:meth:`Orchestrator.run` then raises :class:`~chiffon_worker.errors.BrokerLoginRefused`
(``chiffon orchestrator`` exits 2 with one line), where other broker faults are retried.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from chiffon_worker.config import Config, mask_url
from chiffon_worker.errors import BrokerLoginRefused, RegistryError
from chiffon_worker.orchestrator.agent_control import AgentControl
from chiffon_worker.orchestrator.batch_writer import BatchWriter
from chiffon_worker.orchestrator.drain_enforcer import DrainEnforcer
from chiffon_worker.orchestrator.exporter import MetricsServer, OrchestratorCollector
from chiffon_worker.orchestrator.heartbeat_consumer import HeartbeatConsumer
from chiffon_worker.orchestrator.ingest_counters import IngestStats
from chiffon_worker.orchestrator.judge import HeartbeatJudge, verifier_of
from chiffon_worker.orchestrator.leadership import CHECK_SECONDS, Leadership
from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.orchestrator.worker_events import WorkerEventListener
from chiffon_worker.wire import (
    HEARTBEAT_COPY_PREFIX,
    HEARTBEAT_QUEUE,
    heartbeat_copy_queue,
    heartbeat_queue,
)

log = logging.getLogger(__name__)


class Orchestrator:
    """The orchestrator's parts wired together; :meth:`run` blocks until :meth:`stop`.

    ``metrics_port``: TCP port for ``/metrics`` (0: no HTTP server; None: from config).
    """

    def __init__(self, config: Config, *, metrics_port: int | None = None,
                 queue: str = HEARTBEAT_QUEUE, metrics_addr: str = "0.0.0.0",
                 copy: bool = False) -> None:
        self.config = config
        #: consume a copy of every heartbeat through a queue of its own (``queue``, or one
        #: named after the registry when ``queue`` is the shared heartbeat queue)
        self.copy = copy or queue != HEARTBEAT_QUEUE
        self.metrics_port = config.metrics_port if metrics_port is None else metrics_port
        self.metrics_addr = metrics_addr
        self.queue = queue
        self.registry: Registry | None = None
        self.consumer: HeartbeatConsumer | None = None
        self.metrics: MetricsServer | None = None
        self.events: WorkerEventListener | None = None
        self._events_thread: threading.Thread | None = None
        self._drains_control: AgentControl | None = None
        self._drains_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._refused: BrokerLoginRefused | None = None
        self.leadership: Leadership | None = None
        self._lost_lead = False
        self._lead_thread: threading.Thread | None = None
        self._lead_lock = threading.Lock()

    def stop(self) -> None:
        """Ask :meth:`run` to finish (safe from signal handlers and other threads)."""
        self._stop.set()
        if self.consumer is not None:
            self.consumer.stop()
        if self.events is not None:
            self.events.stop()

    def on_refused(self, refused: BrokerLoginRefused) -> None:
        """The broker refused a login: stop, and have :meth:`run` raise ``refused``."""
        self._refused = refused
        self.stop()

    def run(self) -> None:
        """Open the registry, serve metrics, consume until stopped; always cleans up.

        Raises BrokerLoginRefused when the broker refuses the login (of the consumer or of
        the worker-event listener), RegistryError when the registry fails."""
        self.registry = Registry.from_config(self.config)
        try:
            if self.copy and self.queue == HEARTBEAT_QUEUE:
                self.queue = HEARTBEAT_COPY_PREFIX + self.registry.registry_id()
            self.leadership = Leadership(self.registry, self.queue)
            if not self.leadership.shared:
                self.leadership.acquire(self._stop)  # SQLite: refuses a second orchestrator
            trimmed = self.registry.trim_history()
            if trimmed:
                log.info("dropped %d history points beyond the kept %d per agent", trimmed,
                         self.registry.history_points)
            stats = IngestStats()
            log.info("registry %s: %d agents known", self.registry.masked_url,
                     len(self.registry.agent_ids()))
            # the judge learns each agent's state from the registry in its first batch
            judge = HeartbeatJudge((), history_points=self.registry.history_points,
                                   verifier=verifier_of(self.config), stats=stats)
            self.consumer = HeartbeatConsumer(
                self.config.effective_broker_url, judge, BatchWriter(self.registry, stats=stats),
                queue=self.queue,
                declaration=heartbeat_copy_queue(self.queue) if self.copy
                else heartbeat_queue(self.queue, self.config.queue_type),
                tls=self.config.tls_to_broker)
            if self.metrics_port:
                self.metrics = MetricsServer(
                    OrchestratorCollector(self.registry, stats), self.metrics_port,
                    self.metrics_addr)
            log.info("orchestrator: broker %s, registry %s, heartbeats %s, metrics %s, "
                     "signed heartbeats %s", mask_url(self.config.effective_broker_url),
                     self.registry.masked_url, self.queue,
                     f"port {self.metrics.port}" if self.metrics else "off",
                     judge.verifier.describe())
            if self._stop.is_set():
                return
            self._lead_thread = threading.Thread(target=self._lead, daemon=True,
                                                 name="chiffon-lead")
            self._lead_thread.start()
            self.consumer.run()
            if self._lost_lead:
                raise RegistryError(f"lost the lead on registry {self.registry.masked_url} "
                                    "(its database connection failed); stopping so that "
                                    "another orchestrator, or a restart, takes over")
            if self._refused is not None:
                raise self._refused
        finally:
            self.close()

    def _lead(self) -> None:
        """Take the lead (at once on SQLite; on PostgreSQL when no other orchestrator of
        this registry holds it), then follow the agents' events and re-send drains; stop
        everything if the lead is lost (its database connection failed)."""
        if self.leadership is None or self.registry is None:
            return
        if self.leadership.shared and not self.leadership.acquire(self._stop):
            return
        with self._lead_lock:
            if self._stop.is_set():
                return
            self.events = WorkerEventListener(self.config.effective_broker_url, self.registry,
                                              on_refused=self.on_refused,
                                              tls=self.config.tls_to_broker)
            self._events_thread = threading.Thread(target=self.events.run, daemon=True,
                                                   name="chiffon-worker-events")
            self._events_thread.start()
            # drains an agent missed while it was away are sent again once it is back
            self._drains_control = AgentControl(self.config.effective_broker_url,
                                                tls=self.config.tls_to_broker)
            self._drains_thread = threading.Thread(
                target=DrainEnforcer(self._drains_control).follow,
                args=(self.registry, self._stop), daemon=True, name="chiffon-drain-enforcer")
            self._drains_thread.start()
        while not self._stop.wait(CHECK_SECONDS):
            if self.leadership is not None and not self.leadership.holds():
                self._lost_lead = True
                self.stop()
                return

    def close(self) -> None:
        """Stop the event listener and the metrics server; give up the lead; release the
        registry."""
        self._stop.set()
        with self._lead_lock:  # no part starts after this
            pass
        if self._lead_thread is not None:
            self._lead_thread.join(timeout=5.0)
            self._lead_thread = None
        if self.events is not None:
            self.events.stop()
        if self._events_thread is not None:
            self._events_thread.join(timeout=5.0)
            self._events_thread = None
        self._stop.set()
        if self._drains_thread is not None:
            self._drains_thread.join(timeout=10.0)
            self._drains_thread = None
        if self._drains_control is not None:
            self._drains_control.close()
            self._drains_control = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.leadership is not None:
            self.leadership.release()
            self.leadership = None
        if self.registry is not None:
            self.registry.close()
        log.info("orchestrator stopped")


def run_orchestrator(orchestrator: Orchestrator) -> None:
    """Run ``orchestrator`` in the main thread, stopping cleanly on SIGTERM or SIGINT."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received; stopping", signal.Signals(signum).name)
        orchestrator.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        orchestrator.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
