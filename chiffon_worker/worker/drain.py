"""Draining on the agent: stop and resume consuming the pool queue, and remember it.

An operator drains an agent (``chiffon drain``) to take it out of service: it finishes
its running work and takes nothing new from its pool queue, while its own queue
``chiffon.agent.<id>`` keeps its consumer, so it can still be told things (undrain).

The drain survives a restart: :func:`write_mark` keeps ``<state_dir>/drained`` (JSON: when
and by whom, unix seconds), and a worker that starts with the mark present leaves its
pool queue out (:func:`exclude_pool_if_drained`, called where Celery selects the queues,
so reconnects after a broker outage keep it out too). Undrain removes the mark.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chiffon_worker.wire import declared_queue

log = logging.getLogger(__name__)

#: The mark's file name in the agent's state directory.
MARK_FILE = "drained"


@dataclass(frozen=True, slots=True)
class DrainMark:
    """A drain request as the agent keeps it: when (unix seconds) and who asked."""

    requested_at: float
    requested_by: str


def mark_path(state_dir: str | os.PathLike[str]) -> Path:
    """Where the drain mark of the agent with ``state_dir`` lives."""
    return Path(state_dir) / MARK_FILE


def read_mark(state_dir: str | os.PathLike[str]) -> DrainMark | None:
    """The agent's drain mark, or None when it is not drained.

    A mark that cannot be parsed still drains the agent (by ``unknown``, at time 0): the
    file's presence is the request."""
    path = mark_path(state_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the drain mark %s (%s); treating the agent as drained",
                    path, exc.strerror or exc)
        return DrainMark(0.0, "unknown")
    try:
        data = json.loads(text)
        return DrainMark(float(data["requested_at"]), str(data["requested_by"]))
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("drain mark %s is unreadable (%s); the agent stays drained", path, exc)
        return DrainMark(0.0, "unknown")


def write_mark(state_dir: str | os.PathLike[str], mark: DrainMark) -> Path:
    """Keep ``mark`` (atomically: a partial file is never seen); returns its path.
    Raises OSError when the state directory is not writable."""
    path = mark_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{MARK_FILE}.{os.getpid()}")
    partial.write_text(json.dumps({"requested_at": mark.requested_at,
                                   "requested_by": mark.requested_by}), encoding="utf-8")
    os.replace(partial, path)
    return path


def remove_mark(state_dir: str | os.PathLike[str]) -> bool:
    """Forget the drain mark; returns whether there was one."""
    try:
        mark_path(state_dir).unlink()
    except FileNotFoundError:
        return False
    return True


def exclude_pool_if_drained(queues: Any, state_dir: str, pool: str) -> DrainMark | None:
    """At start: leave ``pool`` out of the queues the worker consumes (Celery's
    ``app.amqp.queues``) when the agent is drained; returns the mark (None: not drained)."""
    mark = read_mark(state_dir)
    if mark is not None:
        queues.deselect(pool)
        log.warning("agent drained (by %s): not consuming pool queue %s; `chiffon undrain` "
                    "resumes it", mark.requested_by, pool)
    return mark


def stop_consuming(consumer: Any, pool: str, why: str = "drained") -> None:
    """Cancel the consumer of ``pool`` (Celery's ``cancel_consumer``); the selection
    changes too, so a reconnect does not bring it back. Runs in the consumer's loop.
    ``why`` starts the log line (a drain, or the owner rules)."""
    consumer.app.amqp.queues.deselect(pool)
    if consumer.task_consumer is not None:
        consumer.task_consumer.cancel_by_queue(pool)
    log.info("%s: no longer consuming pool queue %s", why, pool)


def resume_consuming(consumer: Any, pool: str, why: str = "undrained") -> None:
    """Consume ``pool`` again, declared exactly as at start (the worker's own ``Queue``
    of it, so ``queue_type`` holds; ``wire.declared_queue`` if it has none). Runs in the
    consumer's loop."""
    queues = consumer.app.amqp.queues
    queue = queues.select_add(queues[pool] if pool in queues else declared_queue(pool))
    task_consumer = consumer.task_consumer
    if task_consumer is not None and not task_consumer.consuming_from(pool):
        task_consumer.add_queue(queue)
        task_consumer.consume()
    log.info("%s: consuming pool queue %s again", why, pool)
