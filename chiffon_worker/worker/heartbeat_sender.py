"""Sending one heartbeat: take the snapshot, sign it if configured, publish it, bounded.

The message on ``chiffon.heartbeats`` is the Celery task ``chiffon.heartbeat`` with one
argument, the snapshot, expiring after ``heartbeat_timeout_seconds`` (a stale heartbeat is
worthless, so a backed-up queue drains itself), transient (delivery mode 1), no result.

No ``task-sent`` event goes with it, although the agent's settings turn
``task_send_sent_event`` on (execute_work and other real work need it): a heartbeat is
consumed by the orchestrator, never by a Celery worker, so no other event ever follows,
and Flower would keep every heartbeat as a task PENDING forever (pushing real work out of
its task memory). Each snapshot taken is kept as the agent's latest
(:mod:`.latest_snapshot`) for the views that show it (Flower's worker page).

Publishing never blocks the beat thread for long: Celery's stock scheduler connects once
and retries forever inside its first tick (back-off up to 30 s) and keeps reusing a
connection the broker may have closed (celery#5037, #8030), so heartbeats can stay away
long after the broker is back. Here each heartbeat gets a bounded publish on a connection
with publisher confirms (a dead connection is noticed on the spot, not one heartbeat
later); after a failure the connection is thrown away and the next heartbeat, one interval
later, starts from a fresh one. An outage costs the heartbeats it spans, each logged as
one line, and no more.

Least privilege: on RabbitMQ the heartbeat route is declared only when it is missing and
the agent's user may (:mod:`.heartbeat_route`; an agent's user may only write to
``chiffon.heartbeats``, the orchestrator declares it). A heartbeat the broker refuses for
want of a permission stops the agent with one line and exit status 2, as a refused login.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery.worker import state as worker_state
from kombu.common import ignore_errors
from kombu.exceptions import OperationalError

from chiffon_worker.broker_permissions import AGENT, permission_refused
from chiffon_worker.config import Config, mask_url
from chiffon_worker.errors import EXIT_CONFIG
from chiffon_worker.signing import agent_signing_key, sign_snapshot
from chiffon_worker.wire import HEARTBEAT_TASK, heartbeat_queue
from chiffon_worker.worker.heartbeat_route import HeartbeatRouteMissing, declarations
from chiffon_worker.worker.latest_snapshot import record_snapshot

log = logging.getLogger(__name__)

#: The heartbeat connection: confirmed publishes, one quick reconnect attempt per use.
PUBLISH_TRANSPORT_OPTIONS: dict[str, Any] = {
    "confirm_publish": True,
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.25,
    "interval_max": 0.25,
}
#: What a heartbeat's ``argsrepr`` header says instead of the snapshot's repr.
HEARTBEAT_ARGSREPR = "(snapshot,)"
#: Retries of one publish (a stale connection is replaced at once); ~0.5 s at most.
PUBLISH_RETRY_POLICY: dict[str, Any] = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.25,
    "interval_max": 0.25,
}


class NoSentEvent:
    """The event dispatcher a heartbeat is published with: it publishes nothing, so the
    heartbeat has no ``task-sent`` event (Celery hands the event it built to the
    dispatcher given as ``event_dispatcher``, else to the app's)."""

    def publish(self, *args: Any, **kwargs: Any) -> None:
        """Drop the event."""


#: The one :class:`NoSentEvent` heartbeats are sent with.
NO_SENT_EVENT = NoSentEvent()


class HeartbeatSender:
    """Publishes heartbeats of ``take_snapshot()`` through ``app`` (one thread at a time).

    ``app``: the agent's Celery app (its routes send ``chiffon.heartbeat`` through the
    heartbeat exchange); ``config``: intervals, signing key (``heartbeat_key``, else one
    derived from ``heartbeat_lab_secret``, else ``heartbeat_secret``) and broker URL for
    log lines.
    """

    def __init__(self, app: Any, config: Config,
                 take_snapshot: Callable[[], dict[str, Any]]) -> None:
        self.app = app
        self.config = config
        self.take_snapshot = take_snapshot
        self._failing_since: float | None = None
        self._connection: Any = None
        self._producer: Any = None
        #: what publishing declares on this connection (None: not asked yet; see
        #: heartbeat_route: nothing on RabbitMQ, where agents may lack the permission)
        self._declare: list[Any] | None = None

    def send(self) -> bool:
        """Take a snapshot and publish it; False (one WARNING line) when the broker is away."""
        config = self.config
        snapshot = self.take_snapshot()
        record_snapshot(snapshot)
        key = agent_signing_key(snapshot["agent_id"], heartbeat_key=config.heartbeat_key,
                                lab_secret=config.heartbeat_lab_secret,
                                shared_secret=config.heartbeat_secret)
        if key:
            snapshot = sign_snapshot(snapshot, key)
        producer = self.producer()
        connection = self._connection
        errors = (OperationalError, OSError, *connection.connection_errors,
                  *connection.channel_errors)
        try:
            if self._declare is None:
                self._declare = declarations(
                    connection, heartbeat_queue(queue_type=config.queue_type))
            self.app.send_task(
                HEARTBEAT_TASK, args=[snapshot], producer=producer, declare=self._declare,
                expires=config.heartbeat_timeout_seconds, delivery_mode=1,
                # no result: else the rpc:// backend declares a reply queue per agent run
                ignore_result=True,
                # not Celery's repr of the whole snapshot (~850 characters in two headers
                # of every heartbeat, decoded by every consumer and shown by Flower)
                argsrepr=HEARTBEAT_ARGSREPR, kwargsrepr="{}",
                event_dispatcher=NO_SENT_EVENT,
                retry=True, retry_policy=PUBLISH_RETRY_POLICY,
            )
        except HeartbeatRouteMissing as exc:
            self.close()
            log.warning("heartbeat seq %d not sent: %s", snapshot["seq"], exc)
            return False
        except errors as exc:
            self.close()
            refused = permission_refused("the agent's heartbeat", AGENT, exc)
            if refused is not None:
                stop_the_agent(refused)
                return False
            if self._failing_since is None:
                self._failing_since = time.monotonic()
            log.warning("cannot reach broker at %s: %s; heartbeat seq %d not sent; "
                        "retrying in %g s", mask_url(config.effective_broker_url),
                        short_reason(exc), snapshot["seq"], config.heartbeat_interval_seconds)
            return False
        if self._failing_since is not None:
            log.warning("broker reachable again after %.1f s; heartbeats resumed (seq %d)",
                        time.monotonic() - self._failing_since, snapshot["seq"])
            self._failing_since = None
        log.debug("heartbeat seq %d sent", snapshot["seq"])
        return True

    def producer(self) -> Any:
        """The heartbeat producer; its connection is opened lazily on first publish."""
        if self._producer is None:
            self._connection = self.app.connection_for_write(
                transport_options=PUBLISH_TRANSPORT_OPTIONS)
            self._producer = self.app.amqp.Producer(self._connection, auto_declare=False)
        return self._producer

    def close(self) -> None:
        """Drop the connection (the next :meth:`send` opens a fresh one)."""
        connection, self._connection, self._producer = self._connection, None, None
        self._declare = None
        if connection is not None:
            ignore_errors(connection, connection.release)


def stop_the_agent(refused: BaseException) -> None:
    """A heartbeat the broker refused for want of a permission: the agent says so in one
    ERROR line and stops with exit status 2 (no restart loop: the shipped unit does not
    restart on 2), as for a refused login. An agent whose heartbeats cannot go out is
    invisible to the orchestrator. The worker stops at its next loop turn (Celery's
    ``state.should_stop``, as its signal handlers do: this runs in the beat thread)."""
    if worker_state.should_stop == EXIT_CONFIG:
        return  # said already (another heartbeat went out before the worker stopped)
    log.error("%s", refused)
    worker_state.should_stop = EXIT_CONFIG


def short_reason(exc: BaseException) -> str:
    """A short reason: "connection refused" rather than a repr chain."""
    text = str(exc) or type(exc).__name__
    if "refused" in text.lower():
        return "connection refused"
    return text.splitlines()[0][:200]
