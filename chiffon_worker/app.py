"""The Celery app factory of the agent.

``get_app()`` builds the app once per process: it loads and validates the chiffon config
(a bad config ends the process with one line naming file, key and problem, exit 2),
configures Celery from ``celeryconfig`` and registers the tasks, the worker's start-up
hooks and the ``chiffon_metrics`` inspect command. Nothing happens at import time.

Three small departures from a stock worker, all made here so that a plain
``celery -A chiffon_worker worker -B`` is the whole agent:

- no Mingle and no Gossip (agents need no worker-to-worker chatter; start-up to ready
  drops from ~1.5 s to ~0.5 s);
- ``-B`` runs beat as a thread of the worker process, not a forked process (half the
  memory; heartbeats do not wait on the pool, whose slots are threads or processes);
- without ``-n`` the worker is named ``<agent_id>@<host>`` and without ``-l`` it logs at
  the configured ``log_level``, so Flower and ``celery inspect`` name the agent and two
  agents on one host do not share a remote-control queue.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import uuid
from functools import cached_property
from typing import Any

import click
from amqp.exceptions import AccessRefused
from celery import Celery, signals
from celery.apps.worker import Worker as _CeleryWorker
from celery.beat import EmbeddedService
from celery.exceptions import ImproperlyConfigured
from celery.utils.log import mlevel
from celery.utils.nodenames import host_format
from celery.worker import components
from celery.worker.consumer import Consumer as _CeleryConsumer

from chiffon_worker.agents.base import BOOT_ID_ENV
from chiffon_worker.config import Config, mask_url
from chiffon_worker.errors import ConfigError

log = logging.getLogger(__name__)

EXIT_BAD_CONFIG = 2

_lock = threading.Lock()
_config: Config | None = None
_app: Celery | None = None


#: What Celery's request parsing raises for a task message whose envelope is broken (body
#: not ``[args, kwargs, embed]``, no ``id`` header, ...). Celery lets these escape its
#: consumer: "Unrecoverable error", the worker exits, the message is requeued and kills
#: the next start too.
MALFORMED_ENVELOPE_ERRORS: tuple[type[Exception], ...] = (
    TypeError, ValueError, KeyError, IndexError, AttributeError)


#: Longest wait between the worker's attempts to reach the broker (seconds). Celery's
#: default grows to 30 s, so work resumed up to 30 s after heartbeats did.
RECONNECT_MAX_SECONDS = 5.0


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


class Consumer(_CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer with Mingle and Gossip switched off, whatever the command line,
    and which drops a task message with a broken envelope instead of dying on it.

    (Removing Mingle from the blueprint is not enough: the Tasks step requires it and
    pulls it back in; disabling it is what ``--without-mingle`` does.)
    """

    def __init__(self, *args: Any, worker_options: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        options = dict(worker_options or {}, without_mingle=True, without_gossip=True)
        super().__init__(*args, worker_options=options, **kwargs)

    def ensure_connected(self, conn: Any) -> Any:
        """Reconnect with back-off 1, 2, 3 ... capped at ``RECONNECT_MAX_SECONDS``."""
        ensure = conn.ensure_connection
        conn.ensure_connection = functools.partial(
            ensure, interval_start=1, interval_step=1, interval_max=RECONNECT_MAX_SECONDS)
        try:
            return super().ensure_connected(conn)
        except AccessRefused as exc:
            # Wrong credentials or vhost: a configuration problem, not an outage. One
            # line instead of Celery's "Unrecoverable error" traceback.
            log.error("broker at %s refused the login (check rabbitmq_user, "
                      "rabbitmq_password, rabbitmq_vhost or broker_url): %s",
                      mask_url(conn.as_uri()), exc.reply_text or exc)
            raise SystemExit(EXIT_BAD_CONFIG) from None
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


class ThreadedBeat(components.Beat):  # type: ignore[misc]
    """``-B``: the embedded beat as a thread of the worker process.

    Its only job is the heartbeat, which must not wait on the pool: pool slots are
    threads (or child processes), so a long ``execute_work`` never delays it, and the
    agent stays one process (measured: ~60 MiB instead of ~113 MiB with a forked beat).
    """

    def create(self, w: Any) -> Any:
        pool = w.pool_cls if isinstance(w.pool_cls, str) else w.pool_cls.__module__
        if pool.endswith(("gevent", "eventlet")):
            raise ImproperlyConfigured(components.ERR_B_GREEN)
        w.beat = EmbeddedService(w.app, schedule_filename=w.schedule_filename,
                                 scheduler_cls=w.scheduler, thread=True)
        return w.beat


class Worker(_CeleryWorker):  # type: ignore[misc]
    """The worker behind ``celery -A chiffon_worker worker``."""

    class Blueprint(_CeleryWorker.Blueprint):  # type: ignore[misc]
        default_steps = ({step for step in _CeleryWorker.Blueprint.default_steps
                          if step != "celery.worker.components:Beat"}
                         | {"chiffon_worker.app:ThreadedBeat"})

    def __init__(self, *args: Any, hostname: str | None = None, loglevel: Any = None,
                 **kwargs: Any) -> None:
        config = current_config()
        if _cli_default("hostname"):
            hostname = host_format(f"{config.agent_id}@%h")
        if _cli_default("loglevel"):
            loglevel = mlevel(config.log_level)
        super().__init__(*args, hostname=hostname, loglevel=loglevel, **kwargs)


def _cli_default(option: str) -> bool:
    """True when the running ``celery`` command left ``option`` at its default."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return False
    return ctx.get_parameter_source(option) is click.core.ParameterSource.DEFAULT


class ChiffonCelery(Celery):  # type: ignore[misc]
    """The Celery app class: its workers are :class:`Worker`."""

    @cached_property
    def Worker(self) -> Any:  # Celery's attribute name
        return self.subclass_with_self(Worker)


def current_config() -> Config:
    """The process's config, loaded once; a bad config exits with one line (status 2)."""
    global _config
    with _lock:
        if _config is None:
            try:
                _config = Config()
            except ConfigError as exc:
                sys.stderr.write(f"chiffon: error: {exc}\n")
                sys.stderr.flush()
                raise SystemExit(EXIT_BAD_CONFIG) from None
        return _config


def get_app() -> Celery:
    """The process's Celery app (built on first call)."""
    global _app
    config = current_config()
    with _lock:
        if _app is None:
            app = ChiffonCelery("chiffon_worker", set_as_current=True)
            app.config_from_object("celeryconfig")
            _register(app)
            log.debug("celery app built for agent %s on %s", config.agent_id,
                      mask_url(config.effective_broker_url))
            _app = app
        return _app


def _register(app: Celery) -> None:
    from chiffon_worker import control, tasks

    tasks.register(app)
    control.register()
    signals.worker_init.connect(_on_worker_init, weak=False)
    signals.worker_ready.connect(_on_worker_ready, weak=False)
    request_log = logging.getLogger("celery.worker.request")
    if not any(isinstance(f, AckLostFilter) for f in request_log.filters):
        request_log.addFilter(AckLostFilter())


def _on_worker_init(**_: Any) -> None:
    # One boot id for this run of the agent, shared by every process of it.
    os.environ[BOOT_ID_ENV] = str(uuid.uuid4())


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    config = current_config()
    log.info("chiffon agent %s (%s) ready: pool queue %r, agent queue %r, broker %s, "
             "heartbeat every %g s", config.agent_id, config.hostname, config.pool_queue,
             config.agent_queue, mask_url(config.effective_broker_url),
             config.heartbeat_interval_seconds)
