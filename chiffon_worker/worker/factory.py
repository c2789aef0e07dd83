"""The agent's Celery app, built once per process, and the worker behind ``celery worker``.

:func:`get_app` loads and validates the chiffon config (a bad config ends the process with
one line naming file, key and problem, exit 2), configures Celery from
:func:`~chiffon_worker.worker.settings.celery_settings` (never from a module found by name,
so a stray ``celeryconfig.py`` in the working directory cannot take over the agent), and
registers the task, the inspect command and the worker's start-up hooks. Nothing happens
at import time.

Departures from a stock worker, all made here so that a plain
``celery -A chiffon_worker worker -B`` is the whole agent:

- ``-B`` runs beat as a thread of the worker process (:mod:`.beat`);
- without ``-n`` the worker is named ``<agent_id>@<host>`` and without ``-l`` it logs at
  the configured ``log_level``, so Flower and ``celery inspect`` name the agent and two
  agents on one host do not share a remote-control queue;
- the ready line names the broker and the queues the consumer really uses;
- a drained agent (``<state_dir>/drained``, see :mod:`.drain`) leaves its pool queue out;
- the ``stats`` reply (Flower's worker page) carries the agent's capacity as
  ``chiffon_*`` keys (:mod:`.flower_stats`).
"""

from __future__ import annotations

import logging
import os
import uuid
from functools import cached_property
from pathlib import Path
from typing import Any

import click
from celery import Celery, signals
from celery.apps.worker import Worker as _CeleryWorker
from celery.utils.log import mlevel
from celery.utils.nodenames import host_format

from chiffon_worker.agents.base import BOOT_ID_ENV
from chiffon_worker.config import mask_url
from chiffon_worker.process_local import ProcessLocal
from chiffon_worker.wire import DRAINED_REASON
from chiffon_worker.worker.beat import ThreadedBeat
from chiffon_worker.worker.consumer import install_ack_lost_filter
from chiffon_worker.worker.control import register_control_commands
from chiffon_worker.worker.drain import exclude_pool_if_drained, read_mark
from chiffon_worker.worker.flower_stats import stats_rows
from chiffon_worker.worker.runtime import get_agent, get_config, mark_ready
from chiffon_worker.worker.settings import celery_settings
from chiffon_worker.worker.tasks import register_tasks

log = logging.getLogger(__name__)

#: Where Celery would look for a settings module by name; the agent never does.
CELERY_CONFIG_MODULE_ENV = "CELERY_CONFIG_MODULE"
_STRAY_MODULE = "celeryconfig.py"


class Worker(_CeleryWorker):  # type: ignore[misc]
    """The worker behind ``celery -A chiffon_worker worker``."""

    class Blueprint(_CeleryWorker.Blueprint):  # type: ignore[misc]
        default_steps = ({step for step in _CeleryWorker.Blueprint.default_steps
                          if step != "celery.worker.components:Beat"}
                         | {ThreadedBeat})

    def __init__(self, *args: Any, hostname: str | None = None, loglevel: Any = None,
                 **kwargs: Any) -> None:
        config = get_config()
        if _cli_default("hostname"):
            hostname = host_format(f"{config.agent_id}@%h")
        if _cli_default("loglevel"):
            loglevel = mlevel(config.log_level)
        super().__init__(*args, hostname=hostname, loglevel=loglevel, **kwargs)

    def setup_queues(self, include: Any, exclude: Any = None) -> None:
        """Celery's queue selection (``-Q``, ``-X``), then a drained agent's pool left out."""
        super().setup_queues(include, exclude)
        config = get_config()
        exclude_pool_if_drained(self.app.amqp.queues, config.state_dir, config.agent_pool_name)

    def stats(self) -> dict[str, Any]:
        """Celery's worker statistics (``inspect stats``), plus what the agent can take on
        as ``chiffon_*`` keys (Flower shows them on the worker page, tab "Other")."""
        info: dict[str, Any] = super().stats()
        info.update(stats_rows())
        return info


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


def _build_app() -> Celery:
    config = get_config()
    warn_about_ignored_settings_modules(Path.cwd(), os.environ)
    app = ChiffonCelery("chiffon_worker", set_as_current=True)
    app.config_from_object(celery_settings(config))
    register_tasks(app)
    register_control_commands()
    signals.worker_init.connect(_on_worker_init, weak=False)
    signals.worker_ready.connect(_on_worker_ready, weak=False)
    install_ack_lost_filter()
    log.debug("celery app built for agent %s on %s", config.agent_id,
              mask_url(config.effective_broker_url))
    return app


_app: ProcessLocal[Celery] = ProcessLocal(_build_app)


def get_app() -> Celery:
    """The process's Celery app, ``chiffon_worker.app`` (built on first call)."""
    return _app.get()


def warn_about_ignored_settings_modules(cwd: Path, environ: Any) -> list[str]:
    """Log (and return) one WARNING per settings module Celery users might expect to apply.

    The agent's settings come from the chiffon config alone; a ``celeryconfig.py`` in the
    working directory (other than this project's own, in a checkout) or a
    ``CELERY_CONFIG_MODULE`` in the environment is ignored, and said so.
    """
    ignored: list[str] = []
    stray = cwd / _STRAY_MODULE
    own = Path(__file__).resolve().parents[2] / _STRAY_MODULE
    if stray.is_file() and stray.resolve() != own:
        ignored.append(str(stray))
    named = environ.get(CELERY_CONFIG_MODULE_ENV, "")
    if named:
        ignored.append(f"{CELERY_CONFIG_MODULE_ENV}={named}")
    for what in ignored:
        log.warning("ignoring %s: the chiffon agent takes its Celery settings from the "
                    "chiffon config only (see `chiffon config show`)", what)
    return ignored


def _on_worker_init(**_: Any) -> None:
    # One boot id for this run of the agent, shared by every process of it.
    os.environ[BOOT_ID_ENV] = str(uuid.uuid4())


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """The ready line, from what the consumer really uses (not from the config); and the
    go-ahead for the first heartbeat (see ``beat.FIRST_HEARTBEAT_WAIT_SECONDS``)."""
    config = get_config()
    connection = getattr(sender, "connection", None)
    broker = connection.as_uri() if connection is not None else mask_url(
        config.effective_broker_url)
    task_consumer = getattr(sender, "task_consumer", None)
    queues = sorted(q.name for q in getattr(task_consumer, "queues", ()))
    if task_consumer is not None and config.agent_pool_name not in queues:
        # not consuming the pool: the heartbeat says so from the first one
        drained = read_mark(config.state_dir) is not None
        get_agent().intake.stop(DRAINED_REASON if drained else "pool queue not selected")
    mark_ready()
    log.info("chiffon agent %s (%s) ready: consuming %s, broker %s, heartbeat every %g s",
             config.agent_id, config.hostname, ", ".join(queues) or "nothing",
             mask_url(broker), config.heartbeat_interval_seconds)
