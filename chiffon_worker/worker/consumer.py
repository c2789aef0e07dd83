"""The worker's consumer: Celery's, made fit for an agent that must not die of its input.

- Mingle and Gossip are off whatever the command line (agents need no worker-to-worker
  chatter; start-up to ready drops from ~1.5 s to ~0.5 s).
- Reconnecting backs off 1, 2, 3 ... seconds capped at ``RECONNECT_MAX_SECONDS`` (Celery's
  grows to 30 s, so work resumed up to 30 s after heartbeats did).
- A broker that refuses the login, or a TLS handshake that fails for good (an untrusted,
  expired or misnamed certificate, a client certificate refused: see
  :mod:`chiffon_worker.broker_tls`), is a configuration problem, not an outage: one line and
  exit status 2, as for a bad config file. So is a permission the broker refuses (declaring,
  binding or consuming the agent's queues: one line naming the role, agent, and the
  permission; :mod:`chiffon_worker.broker_permissions`), and a second agent with the same
  name (agent id and host) as a running one: RabbitMQ locks the first one's remote-control
  queue. After a lost connection, though, that lock may be this agent's own: a RabbitMQ
  node that stops (or a broker that has not yet noticed a dead connection) holds the
  exclusive queue of the connection it lost for a moment after the agent is back on
  another node. So a lock met on reconnecting is retried every second for
  ``PIDBOX_RELEASE_SECONDS`` before it counts as a second agent.
- A task message with a broken envelope is logged and dropped, never requeued (Celery lets
  the parse error escape: "Unrecoverable error", and the requeued message kills the next
  start too).
- :class:`AckLostFilter` turns kombu's CRITICAL "Couldn't ack" into one WARNING line.
- Celery's native delayed delivery is left out (``queue_type: quorum`` would switch it on):
  see :data:`DELAYED_DELIVERY_STEP`.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from amqp.exceptions import AccessRefused, ResourceLocked
from celery.worker.consumer import Consumer as _CeleryConsumer

from chiffon_worker.broker_permissions import AGENT, permission_refused
from chiffon_worker.config import mask_url
from chiffon_worker.errors import EXIT_CONFIG, BrokerTlsFailed
from chiffon_worker.worker.runtime import get_config

log = logging.getLogger(__name__)

#: What Celery's request parsing raises for a task message whose envelope is broken (body
#: not ``[args, kwargs, embed]``, no ``id`` header, ...).
MALFORMED_ENVELOPE_ERRORS: tuple[type[Exception], ...] = (
    TypeError, ValueError, KeyError, IndexError, AttributeError)

#: Longest wait between the worker's attempts to reach the broker (seconds).
RECONNECT_MAX_SECONDS = 5.0
#: The AMQP heartbeat the agent asks the broker for (``broker_heartbeat``, seconds): RabbitMQ
#: drops a connection that stays silent for two of them.
BROKER_HEARTBEAT_SECONDS = 10
#: How long after a lost connection a locked remote-control queue is taken for the lost
#: connection's, still held by the broker, and retried (seconds): three AMQP heartbeats,
#: by when RabbitMQ has dropped a dead connection.
PIDBOX_RELEASE_SECONDS = 3.0 * BROKER_HEARTBEAT_SECONDS
#: Seconds between those retries.
PIDBOX_RETRY_SECONDS = 1.0
#: Celery's native delayed delivery (5.5+), a consumer step that switches itself on when a
#: queue is a quorum queue. Chiffon sends no ETA or countdown tasks, and the step costs: at
#: each consumer (re)start it declares 28 ``celery_delayed_*`` exchanges and queues on every
#: URL of the failover list, logs a WARNING per direct exchange (every chiffon queue's), and
#: retries a stopped node for ~17 s (1 + 3 + 5 s and the attempts) before the consumer
#: takes work again: measured after stopping one node of a three-node cluster.
DELAYED_DELIVERY_STEP = "celery.worker.consumer.delayed_delivery:DelayedDelivery"
#: The owner rules' watch (``worker/owner_watch.py``) and the sleep announcer
#: (``worker/sleep_announcer.py``), consumer steps of ours.
OWNER_WATCH_STEP = "chiffon_worker.worker.owner_watch:OwnerWatchStep"
SLEEP_STEP = "chiffon_worker.worker.sleep_announcer:SleepStep"


class AckLostFilter(logging.Filter):
    """Turns kombu's CRITICAL "Couldn't ack" (with a traceback) into one WARNING line.

    With acks late, a task that finished after the broker connection dropped cannot be
    acknowledged; the broker redelivers it, which is the intended outcome, not a crisis.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Couldn't ack"):
            tag = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = ("ack of delivery %r lost with the broker connection; the broker "
                          "will redeliver the message")
            record.args = (tag,)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


def install_ack_lost_filter() -> None:
    """Put :class:`AckLostFilter` on Celery's request logger (once per process)."""
    request_log = logging.getLogger("celery.worker.request")
    if not any(isinstance(f, AckLostFilter) for f in request_log.filters):
        request_log.addFilter(AckLostFilter())


class Consumer(_CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer with the changes listed in the module docstring.

    (Removing Mingle from the blueprint is not enough: the Tasks step requires it and
    pulls it back in; disabling it is what ``--without-mingle`` does.)
    """

    class Blueprint(_CeleryConsumer.Blueprint):  # type: ignore[misc]
        """Celery's consumer steps without native delayed delivery, with the owner watch
        and the sleep announcer."""

        default_steps = [*(step for step in _CeleryConsumer.Blueprint.default_steps
                           if step != DELAYED_DELIVERY_STEP), OWNER_WATCH_STEP, SLEEP_STEP]

    def __init__(self, *args: Any, worker_options: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        options = dict(worker_options or {}, without_mingle=True, without_gossip=True)
        super().__init__(*args, worker_options=options, **kwargs)

    #: set once a live broker connection was lost (Celery's "Connection to broker lost")
    lost_a_connection = False

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        """Celery's handling of a lost connection; notes that one was lost."""
        self.lost_a_connection = True
        super().on_connection_error_after_connected(exc)

    def start(self) -> Any:
        """Celery's start; a permission the broker refuses, or a worker of the same name
        already running, ends this one with one line and exit status 2 (the shipped unit
        does not restart it). A remote-control queue found locked after a lost connection
        is retried for ``PIDBOX_RELEASE_SECONDS`` first (see the module docstring)."""
        locked_since: float | None = None
        while True:
            try:
                return super().start()
            except AccessRefused as exc:
                refused = permission_refused("the agent", AGENT, exc)
                if refused is None:
                    raise
                log.error("%s", refused)
                raise SystemExit(EXIT_CONFIG) from None
            except ResourceLocked as exc:
                # the exclusive remote-control queue <name>.celery.pidbox is held by
                # another connection: this agent's lost one, or a live worker of the same
                # name (the same agent_id already runs on this host)
                problem = (exc.reply_text or str(exc)).split(". ")[0]
                now = time.monotonic()
                locked_since = now if locked_since is None else locked_since
                if not self.lost_a_connection or now - locked_since >= PIDBOX_RELEASE_SECONDS:
                    log.error("another agent already runs as %s on this broker (%s); give "
                              "this one its own agent_id (agent.yml or CHIFFON_AGENT_ID) or "
                              "stop the other", self.hostname, problem)
                    raise SystemExit(EXIT_CONFIG) from None
                log.warning("the broker still holds the remote-control queue of %s for the "
                            "connection this agent lost (%s); trying again in %.0f s",
                            self.hostname, problem, PIDBOX_RETRY_SECONDS)
                self.restart_after_lock()
                time.sleep(PIDBOX_RETRY_SECONDS)

    def restart_after_lock(self) -> None:
        """Close what the failed start opened, as Celery does after a connection error,
        so that :meth:`start` can start the blueprint again."""
        self.on_close()
        cancel = getattr(self, "_cancel_connection_timer_entries", None)
        if cancel is not None:  # Celery 5.6+
            cancel()
        self.blueprint.restart(self)

    def ensure_connected(self, conn: Any) -> Any:
        """Reconnect with back-off 1, 2, 3 ... capped at ``RECONNECT_MAX_SECONDS``; a refused
        login or a failed TLS handshake ends the agent with one line and exit status 2."""
        ensure = functools.partial(conn.ensure_connection, interval_start=1, interval_step=1,
                                   interval_max=RECONNECT_MAX_SECONDS)
        tls = get_config().tls_to_broker

        def ensure_connection(errback: Any = None, *args: Any, **kwargs: Any) -> Any:
            def on_error(exc: BaseException, interval: float) -> None:
                masked = mask_url(conn.as_uri(include_password=True))  # our masking rules
                failed = tls.failure(masked, exc, masked)
                if failed is not None:  # before Celery's "Cannot connect ... Trying again"
                    raise failed
                if errback is not None:
                    errback(exc, interval)

            return ensure(on_error, *args, **kwargs)

        conn.ensure_connection = ensure_connection
        try:
            return super().ensure_connected(conn)
        except AccessRefused as exc:
            log.error("broker at %s refused the login (check rabbitmq_user, "
                      "rabbitmq_password, rabbitmq_vhost or broker_url): %s",
                      mask_url(conn.as_uri(include_password=True)), exc.reply_text or exc)
            raise SystemExit(EXIT_CONFIG) from None
        except BrokerTlsFailed as exc:
            log.error("%s", exc)
            raise SystemExit(EXIT_CONFIG) from None
        finally:
            del conn.ensure_connection  # back to the class's method

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> None:
            # Only parsing happens here (tasks run in the pool), so these errors can only
            # come from the message itself; connection errors are not among them.
            try:
                handle(message)
            except MALFORMED_ENVELOPE_ERRORS as exc:
                self._drop_malformed(message, exc)

        return on_task_received

    def _drop_malformed(self, message: Any, exc: Exception) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        log.error("dropped a malformed task message (task %r, id %r, %d bytes): %s: %s",
                  headers.get("task"), headers.get("id"), len(message.body or b""),
                  type(exc).__name__, exc)
        if not message.acknowledged:
            message.reject_log_error(log, self.connection_errors, requeue=False)
