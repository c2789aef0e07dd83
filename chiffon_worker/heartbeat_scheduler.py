"""The embedded beat's scheduler: heartbeats with the snapshot computed at send time.

``celery worker -B`` runs beat as a thread of the worker (see ``chiffon_worker.app``), so
heartbeats keep flowing while ``execute_work`` occupies every pool slot. The schedule
lives in memory (no ``celerybeat-schedule`` file); the first heartbeat is due at start,
then one every ``heartbeat_interval_seconds``. Each message is the task
``chiffon.heartbeat`` with one argument, the snapshot, expiring after
``heartbeat_timeout_seconds`` (a stale heartbeat is worthless, so a backed-up queue
drains itself).

Publishing never blocks the beat for long: Celery's stock scheduler connects once and
retries forever inside its first tick (with a back-off up to 30 s), and keeps reusing a
connection the broker may have closed (celery#5037, #8030), so heartbeats can stay away
long after the broker is back. Here each heartbeat gets a bounded publish on a connection
with publisher confirms (a dead connection is noticed on the spot, not one heartbeat
later); after a failure the connection is thrown away and the next heartbeat, one
interval later, starts from a fresh one. An outage costs the heartbeats it spans, each
logged as one line, and no more.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from celery.beat import ScheduleEntry, Scheduler
from celery.schedules import schedule
from kombu.common import ignore_errors
from kombu.exceptions import OperationalError

from chiffon_worker.app import current_config
from chiffon_worker.celery_settings import HEARTBEAT_TASK, heartbeat_queue
from chiffon_worker.config import mask_url
from chiffon_worker.runtime import current_agent

log = logging.getLogger(__name__)

HEARTBEAT_ENTRY = "chiffon-heartbeat"
#: The heartbeat connection: confirmed publishes, one quick reconnect attempt per use.
PUBLISH_TRANSPORT_OPTIONS: dict[str, Any] = {
    "confirm_publish": True,
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.25,
    "interval_max": 0.25,
}
#: Retries of one publish (a stale connection is replaced at once); ~0.5 s at most.
PUBLISH_RETRY_POLICY: dict[str, Any] = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.25,
    "interval_max": 0.25,
}


class HeartbeatScheduler(Scheduler):  # type: ignore[misc]
    """In-memory beat scheduler whose heartbeat entry carries a fresh snapshot."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._config = current_config()
        self._failing_since: float | None = None
        self._connection: Any = None
        self._publisher: Any = None
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        super().setup_schedule()
        interval = timedelta(seconds=self._config.heartbeat_interval_seconds)
        entry = ScheduleEntry(
            name=HEARTBEAT_ENTRY, task=HEARTBEAT_TASK, schedule=schedule(interval, app=self.app),
            last_run_at=self.app.now() - interval,  # due at start, not one interval later
            app=self.app,
        )
        self.data[HEARTBEAT_ENTRY] = entry
        log.info("heartbeat every %g s to %s (expires after %g s)",
                 self._config.heartbeat_interval_seconds, heartbeat_queue().name,
                 self._config.heartbeat_timeout_seconds)

    @property
    def producer(self) -> Any:
        """The base class's tick asks for this; connecting happens per publish instead
        (the base version would block the beat, retrying forever, while the broker is down)."""
        return None

    def apply_entry(self, entry: ScheduleEntry, producer: Any = None) -> None:
        if entry.task != HEARTBEAT_TASK:
            super().apply_entry(entry, producer=self._producer())
            return
        self.send_heartbeat()

    def send_heartbeat(self) -> None:
        """Take a snapshot and publish it; a broker outage costs this heartbeat only."""
        config = self._config
        snapshot = current_agent(config).snapshot()
        if config.heartbeat_secret:
            from chiffon_worker.signing import sign_snapshot

            snapshot = sign_snapshot(snapshot, config.heartbeat_secret)
        producer = self._producer()
        connection = self._connection
        errors = (OperationalError, OSError, *connection.connection_errors,
                  *connection.channel_errors)
        try:
            self.app.send_task(
                HEARTBEAT_TASK, args=[snapshot], producer=producer,
                expires=config.heartbeat_timeout_seconds, delivery_mode=1,
                # no result: else the rpc:// backend declares a reply queue per agent run
                ignore_result=True,
                retry=True, retry_policy=PUBLISH_RETRY_POLICY,
            )
        except errors as exc:
            self._drop_connection()
            if self._failing_since is None:
                self._failing_since = time.monotonic()
            log.warning("cannot reach broker at %s: %s; heartbeat seq %d not sent; "
                        "retrying in %g s", mask_url(config.effective_broker_url),
                        _reason(exc), snapshot["seq"], config.heartbeat_interval_seconds)
            return
        if self._failing_since is not None:
            log.warning("broker reachable again after %.1f s; heartbeats resumed (seq %d)",
                        time.monotonic() - self._failing_since, snapshot["seq"])
            self._failing_since = None
        log.debug("heartbeat seq %d sent", snapshot["seq"])

    def close(self) -> None:
        self._drop_connection()
        super().close()

    def _producer(self) -> Any:
        """The heartbeat producer; its connection is opened lazily on first publish."""
        if self._publisher is None:
            self._connection = self.app.connection_for_write(
                transport_options=PUBLISH_TRANSPORT_OPTIONS)
            self._publisher = self.app.amqp.Producer(self._connection, auto_declare=False)
        return self._publisher

    def _drop_connection(self) -> None:
        connection, self._connection, self._publisher = self._connection, None, None
        if connection is not None:
            ignore_errors(connection, connection.release)


def _reason(exc: BaseException) -> str:
    """A short reason: "connection refused" rather than a repr chain."""
    text = str(exc) or type(exc).__name__
    if "refused" in text.lower():
        return "connection refused"
    return text.splitlines()[0][:200]
