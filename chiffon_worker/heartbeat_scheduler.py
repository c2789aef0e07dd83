"""The embedded beat's scheduler: heartbeats with the snapshot computed at send time.

``celery worker -B`` runs beat in its own process, so heartbeats keep flowing while
``execute_work`` occupies every pool slot. The schedule lives in memory (no
``celerybeat-schedule`` file); the first heartbeat is due at start, then one every
``heartbeat_interval_seconds``. Each message is the task ``chiffon.heartbeat`` with one
argument, the snapshot, expiring after ``heartbeat_timeout_seconds`` (a stale heartbeat
is worthless, so a backed-up queue drains itself).
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from celery.beat import ScheduleEntry, Scheduler
from celery.schedules import schedule
from kombu.exceptions import OperationalError

from chiffon_worker.app import current_config
from chiffon_worker.celery_settings import HEARTBEAT_TASK, heartbeat_queue
from chiffon_worker.config import mask_url
from chiffon_worker.runtime import current_agent

log = logging.getLogger(__name__)

HEARTBEAT_ENTRY = "chiffon-heartbeat"
#: How long one publish may retry before the heartbeat is given up (seconds).
PUBLISH_RETRY_BUDGET_SECONDS = 2.0


class HeartbeatScheduler(Scheduler):  # type: ignore[misc]
    """In-memory beat scheduler whose heartbeat entry carries a fresh snapshot."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._config = current_config()
        self._failing_since: float | None = None
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

    def apply_entry(self, entry: ScheduleEntry, producer: Any = None) -> None:
        if entry.task != HEARTBEAT_TASK:
            super().apply_entry(entry, producer=producer)
            return
        self.send_heartbeat(producer)

    def send_heartbeat(self, producer: Any = None) -> None:
        """Take a snapshot and publish it; a broker outage costs this heartbeat only."""
        config = self._config
        snapshot = current_agent(config).snapshot()
        if config.heartbeat_secret:
            from chiffon_worker.signing import sign_snapshot  # type: ignore[import-not-found,unused-ignore]

            snapshot = sign_snapshot(snapshot, config.heartbeat_secret)
        try:
            self.app.send_task(
                HEARTBEAT_TASK, args=[snapshot], producer=producer,
                expires=config.heartbeat_timeout_seconds, delivery_mode=1,
                retry=True, retry_policy={"max_retries": 3, "interval_start": 0.2,
                                          "interval_step": 0.3,
                                          "interval_max": PUBLISH_RETRY_BUDGET_SECONDS / 3},
            )
        except (OperationalError, OSError) as exc:
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


def _reason(exc: BaseException) -> str:
    """A short reason: "connection refused" rather than a repr chain."""
    text = str(exc) or type(exc).__name__
    if "refused" in text.lower():
        return "connection refused"
    return text.splitlines()[0][:200]
