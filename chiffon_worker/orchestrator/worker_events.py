"""Signs of life from Celery's worker events: an agent's death in seconds, not minutes.

Every agent's worker sends Celery events (``worker_send_task_events`` is on, for Flower):
``worker-online`` at start, ``worker-heartbeat`` every 2 s, and ``worker-offline`` on a
clean stop. :class:`WorkerEventListener` reads them the way Flower does, from a private
auto-delete queue bound to the ``celeryev`` topic exchange with ``worker.#``, keeps the
newest per agent in memory and writes them to the registry's ``chiffon_signs_of_life``
once per ``flush_seconds``. Task events (``task.#``) say when placed work starts and
ends: they go to ``chiffon_reservations`` (``Registry.record_work_events``), which ends
what a placement held; :func:`~.liveness.liveness_of` turns them into ``online``,
``stopped`` and ``lost``. Times stored are receipt times (the orchestrator's clock).

A worker named ``<agent_id>@<host>`` (the agent's default name) is matched to the agent
``agent_id``; events of workers that are not agents in the registry are ignored. The
broker traffic this reads is what every agent already sends for Flower: one event of
about 280 bytes of body every 2 s per agent (~8.4 KB a minute; ``bench/liveness.py``).

A broker that refuses the login, or a permission (declaring or binding its event queue,
consuming it, asking workers for heartbeats: BrokerPermissionRefused, naming the role
orchestrator and the permission), ends the listener instead of being retried: it keeps the
:class:`~chiffon_worker.errors.BrokerLoginRefused` in :attr:`WorkerEventListener.refused`
and calls ``on_refused`` with it (the orchestrator stops with exit status 2).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery.events.event import get_exchange
from kombu.connection import Connection
from kombu.entity import Queue, binding
from kombu.messaging import Consumer
from kombu.pidbox import Mailbox

from chiffon_worker.broker_permissions import ORCHESTRATOR, permission_refused
from chiffon_worker.broker_tls import BrokerTls
from chiffon_worker.config import mask_url
from chiffon_worker.errors import BrokerLoginRefused, RegistryError
from chiffon_worker.orchestrator.registry import Registry, WorkEvent
from chiffon_worker.orchestrator.reservations import EVENT_STATES
from chiffon_worker.wire import (
    CONTROL_MAILBOX,
    EXECUTE_WORK_TASK,
    HEARTBEAT_CONTROL_COMMAND,
    ORCHESTRATOR_EVENTS_QUEUE_PREFIX,
    TASK_EVENTS_ROUTING_KEY,
    WORKER_EVENTS_EXCHANGE,
    WORKER_EVENTS_ROUTING_KEY,
)

log = logging.getLogger(__name__)

#: Event types that show a worker alive, and the one that says it stopped cleanly.
ALIVE_EVENTS = frozenset({"worker-online", "worker-heartbeat"})
OFFLINE_EVENT = "worker-offline"
#: Celery's default event heartbeat interval, for events that do not say (seconds).
DEFAULT_EVENT_INTERVAL_SECONDS = 2.0
#: How often the set of known agent ids is read again from the registry (seconds).
KNOWN_REFRESH_SECONDS = 5.0
_CONNECT_TIMEOUT_SECONDS = 5
#: Most events read from one message (workers buffer task events into lists).
_MAX_EVENTS_PER_MESSAGE = 10_000


def agent_id_of(worker_name: str) -> str:
    """The agent id in a worker name ``<agent_id>@<host>`` (agent ids hold no ``@``)."""
    return worker_name.partition("@")[0]


class WorkerEventListener:
    """Follows worker events on ``broker_url`` into ``registry`` until :meth:`stop`.

    ``flush_seconds``: how often signs are written (and how long an idle read waits);
    ``clock``: receipt times (unix seconds); tests pass their own;
    ``on_refused``: called (in the listener's thread) when the broker refuses the login
    (or the TLS handshake fails: BrokerTlsFailed);
    ``tls``: TLS to an ``amqps://``/``rediss://`` broker (default: the system's CAs).
    """

    def __init__(self, broker_url: str, registry: Registry, *, flush_seconds: float = 0.25,
                 reconnect_max_seconds: float = 10.0,
                 clock: Callable[[], float] = time.time,
                 on_refused: Callable[[BrokerLoginRefused], None] | None = None,
                 tls: BrokerTls | None = None) -> None:
        self.broker_url = broker_url
        self.tls = tls or BrokerTls()
        self.on_refused = on_refused
        #: why the listener ended, when the broker refused its login
        self.refused: BrokerLoginRefused | None = None
        self.registry = registry
        self.flush_seconds = flush_seconds
        self.reconnect_max_seconds = reconnect_max_seconds
        self.clock = clock
        #: set while consuming events
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._pending: dict[str, dict[str, Any]] = {}
        self._newest: dict[str, dict[str, Any]] = {}
        self._known: set[str] = set()
        self._work: list[WorkEvent] = []
        self._known_at = float("-inf")
        #: whether a connection was ever consuming (the next one is a reconnect)
        self._consumed_before = False

    def stop(self) -> None:
        """Ask :meth:`run` to return (any thread)."""
        self._stop.set()

    def run(self) -> None:
        """Consume events until stopped, reconnecting with back-off after broker loss; a
        refused login ends it (see :attr:`refused`)."""
        delay = 1.0
        while not self._stop.is_set():
            conn = Connection(self.broker_url, connect_timeout=_CONNECT_TIMEOUT_SECONDS,
                              ssl=self.tls.kombu_ssl(self.broker_url))
            recoverable = (*conn.connection_errors, *conn.channel_errors, OSError)
            try:
                conn.connect()
                delay = 1.0
                self._consume(conn)
            except recoverable as exc:
                if self._refused(exc, conn.as_uri()):
                    break
                log.warning("worker events on %s: %s; reconnecting in %.0f s",
                            mask_url(self.broker_url), str(exc)[:200] or type(exc).__name__,
                            delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self.reconnect_max_seconds)
            finally:
                self.ready.clear()
                try:
                    conn.release()
                except (OSError, *conn.connection_errors) as exc:
                    log.debug("closing the events connection: %s", exc)
        self.flush()

    def _refused(self, exc: BaseException, node_url: str) -> bool:
        """If ``exc`` is a refused login or a failed TLS handshake with ``node_url``: keep
        it, stop, tell ``on_refused``; returns whether it was."""
        refused = permission_refused("chiffon orchestrator", ORCHESTRATOR, exc) \
            or self.tls.refusal(mask_url(self.broker_url), exc, node_url)
        if refused is None:
            return False
        self.refused = refused
        self.stop()
        if self.on_refused is not None:
            self.on_refused(refused)
        return True

    def _consume(self, conn: Connection) -> None:
        # as Celery's event dispatcher declares it: a topic exchange, fanout on Redis
        exchange = get_exchange(conn, WORKER_EVENTS_EXCHANGE)
        keys = [WORKER_EVENTS_ROUTING_KEY, TASK_EVENTS_ROUTING_KEY]
        if exchange.type == "fanout":  # Redis: every event arrives through one binding
            keys = keys[:1]
        queue = Queue(f"{ORCHESTRATOR_EVENTS_QUEUE_PREFIX}{id(self):x}.{int(time.time())}",
                      bindings=[binding(exchange, routing_key=key) for key in keys],
                      auto_delete=True, durable=False, exclusive=True, message_ttl=10.0)
        consumer = Consumer(conn.channel(), queues=[queue], callbacks=[self.record_event],
                            accept=["json"], no_ack=True)
        consumer.consume()
        log.info("following worker events on %s", mask_url(conn.as_uri()))  # the node
        if self._consumed_before:
            self._ask_for_heartbeats(conn)
        self._consumed_before = True
        self.ready.set()
        last_write = time.monotonic()
        while not self._stop.is_set():
            try:
                conn.drain_events(timeout=self.flush_seconds)
            except TimeoutError:
                conn.heartbeat_check()
            if time.monotonic() - last_write >= self.flush_seconds:
                self.flush()
                last_write = time.monotonic()

    @staticmethod
    def _ask_for_heartbeats(conn: Connection) -> None:
        """After a reconnect: ask every worker for a ``worker-heartbeat`` event now.

        Events sent while this listener was away are lost (its queue goes with its
        connection, and on a cluster with its node), and a single lost ``worker-heartbeat``
        makes a live agent look ``lost`` for a moment (the event window is two intervals).
        A worker that reconnected before this listener answers this; one that reconnects
        after it announces itself (``worker-online``). The answer says ``freq`` 5 s
        (Celery's), so that agent's window is 10 s until its next regular event (2 s).
        """
        Mailbox(CONTROL_MAILBOX, type="fanout", accept=["json"], serializer="json")(
            conn).abcast(HEARTBEAT_CONTROL_COMMAND)
        log.info("asked every worker for a heartbeat event (events may have been missed "
                 "while reconnecting)")

    def record_event(self, body: Any, _message: Any = None) -> None:
        """Note one event (a decoded Celery event body; a worker sends its task events
        buffered, several in one list); invalid ones are ignored."""
        if isinstance(body, list):
            for event in body[:_MAX_EVENTS_PER_MESSAGE]:
                self.record_event(event)
            return
        if not isinstance(body, dict):
            return
        kind, name = body.get("type"), body.get("hostname")
        if not isinstance(kind, str) or not isinstance(name, str) or "@" not in name:
            return
        now = self.clock()
        agent_id = agent_id_of(name)
        if kind.startswith("task-"):
            self._record_work(kind, body, agent_id, now)
            return
        freq = body.get("freq")
        interval = float(freq) if isinstance(freq, int | float) and not isinstance(
            freq, bool) and 0 < freq <= 3600 else DEFAULT_EVENT_INTERVAL_SECONDS
        row = dict(self._newest.get(agent_id) or {
            "agent_id": agent_id, "worker_name": name, "last_event_at": now,
            "event_interval_seconds": interval, "offline_at": None})
        row["worker_name"] = name
        if kind in ALIVE_EVENTS:
            row["last_event_at"] = now
            row["event_interval_seconds"] = interval
        elif kind == OFFLINE_EVENT:
            row["offline_at"] = now
        else:
            return
        self._newest[agent_id] = row
        self._pending[agent_id] = row

    def _record_work(self, kind: str, body: dict[str, Any], agent_id: str, now: float) -> None:
        """Note what a task event says about a piece of work (receipt time ``now``)."""
        state = EVENT_STATES.get(kind)
        work_id = body.get("uuid")
        if state is None or not isinstance(work_id, str) or not work_id:
            return
        if kind == "task-received" and body.get("name") != EXECUTE_WORK_TASK:
            return
        self._work.append(WorkEvent(work_id, agent_id, state, now))

    def flush(self) -> None:
        """Write the signs that changed since the last write (for agents in the registry)
        and the work the task events showed starting and ending."""
        if self._work:
            work, self._work = self._work, []
            try:
                self.registry.record_work_events(work)
            except RegistryError as exc:
                log.error("%s (work events kept for the next write)", exc)
                self._work = work + self._work
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        try:
            age = time.monotonic() - self._known_at
            if age >= KNOWN_REFRESH_SECONDS or (
                    age >= self.flush_seconds and not set(pending) <= self._known):
                self._known = self.registry.agent_ids()
                self._known_at = time.monotonic()
            self.registry.write_signs([row for agent_id, row in pending.items()
                                       if agent_id in self._known])
        except RegistryError as exc:
            log.error("%s (signs of life kept for the next write)", exc)
            self._pending = {**pending, **self._pending}
