"""``-B``: the embedded beat as a thread of the worker, with the heartbeat schedule.

Beat's only job is the heartbeat, which must not wait on the pool: pool slots are
threads (or child processes), so a long ``execute_work`` never delays it, and the agent
stays one process (measured: ~60 MiB instead of ~113 MiB with Celery's forked beat).
The schedule lives in memory (no ``celerybeat-schedule`` file); the first heartbeat is
due at start, then one every ``heartbeat_interval_seconds``.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery.beat import EmbeddedService, ScheduleEntry, Scheduler
from celery.exceptions import ImproperlyConfigured
from celery.schedules import schedule
from celery.worker import components

from chiffon_worker.wire import HEARTBEAT_QUEUE, HEARTBEAT_TASK
from chiffon_worker.worker.heartbeat_sender import HeartbeatSender
from chiffon_worker.worker.runtime import get_agent, get_config, mark_stopping, wait_ready

log = logging.getLogger(__name__)

HEARTBEAT_ENTRY = "chiffon-heartbeat"
#: The first heartbeat waits (at most this long, seconds) until the worker is consuming: a
#: second agent started with the id of a running one on the same host stops as its
#: consumer starts, and must not announce itself first (its heartbeat would supersede
#: the live agent's). A broker that is down at start only delays it by this much.
FIRST_HEARTBEAT_WAIT_SECONDS = 5.0


class ThreadedBeat(components.Beat):  # type: ignore[misc]
    """The worker's Beat step, starting beat as a thread instead of a process."""

    def create(self, w: Any) -> Any:
        pool = w.pool_cls if isinstance(w.pool_cls, str) else w.pool_cls.__module__
        if pool.endswith(("gevent", "eventlet")):
            raise ImproperlyConfigured(components.ERR_B_GREEN)
        w.beat = EmbeddedService(w.app, schedule_filename=w.schedule_filename,
                                 scheduler_cls=w.scheduler, thread=True)
        return w.beat

    def close(self, w: Any) -> None:
        mark_stopping()
        super().close(w)

    def stop(self, w: Any) -> Any:
        mark_stopping()
        return super().stop(w)


def _take_snapshot() -> dict[str, Any]:
    return get_agent().snapshot()


class HeartbeatScheduler(Scheduler):  # type: ignore[misc]
    """In-memory beat scheduler whose heartbeat entry publishes a fresh snapshot."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._config = get_config()
        self._sender: HeartbeatSender | None = None
        self._first_sent = False
        super().__init__(*args, **kwargs)

    @property
    def sender(self) -> HeartbeatSender:
        """The heartbeat sender (made on first use, when the app is known)."""
        if self._sender is None:
            self._sender = HeartbeatSender(self.app, self._config, _take_snapshot)
        return self._sender

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
                 self._config.heartbeat_interval_seconds, HEARTBEAT_QUEUE,
                 self._config.heartbeat_timeout_seconds)

    @property
    def producer(self) -> Any:
        """The base class's tick asks for this; connecting happens per publish instead
        (the base version would block the beat, retrying forever, while the broker is down)."""
        return None

    def apply_entry(self, entry: ScheduleEntry, producer: Any = None) -> None:
        if entry.task == HEARTBEAT_TASK:
            if not self._first_sent:
                if not wait_ready(FIRST_HEARTBEAT_WAIT_SECONDS):
                    return  # the worker stopped before it was ready: announce nothing
                self._first_sent = True
            self.sender.send()
            return
        super().apply_entry(entry, producer=self.sender.producer())

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
        super().close()
