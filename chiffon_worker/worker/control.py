"""Worker remote control: ``celery -A chiffon_worker inspect chiffon_metrics``, and the
``chiffon_drain`` / ``chiffon_undrain`` control commands behind ``chiffon drain`` and
``chiffon undrain``.

``inspect chiffon_metrics``: every agent answers with its current snapshot (``seq`` 0: an
ad-hoc view, not a heartbeat).

``chiffon_drain`` (arguments ``requested_by``, ``requested_at`` in unix seconds): keep
the drain mark in the state directory (a repeated drain keeps the first), report
``accepting: false`` from now on, and cancel the consumer of the pool queue; running work
finishes, the agent's own queue keeps its consumer. ``chiffon_undrain``: remove the mark
and consume the pool queue again. Both answer ``{"ok": text, "pool": name,
"was_drained": bool, "persisted": bool, "work_running": int | null}``; ``persisted``
false: the mark could not be written or removed (``error`` says why), the running agent
obeys anyway.

``inspect conf`` (what Flower's Config tab shows) is replaced by :func:`chiffon_conf`:
Celery's settings with only secrets masked and no Python reprs (see :mod:`.shown_settings`).

Celery keeps remote-control commands in one process-wide table, so registering twice is
harmless (the second registration replaces the first with the same function).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.utils.serialization import strtobool
from celery.worker.control import control_command, inspect_command

from chiffon_worker.agents.intake import DRAIN, OWNER
from chiffon_worker.wire import (
    DRAIN_CONTROL_COMMAND,
    DRAINED_REASON,
    METRICS_INSPECT_COMMAND,
    UNDRAIN_CONTROL_COMMAND,
)
from chiffon_worker.worker import drain
from chiffon_worker.worker.runtime import get_agent, get_config
from chiffon_worker.worker.shown_settings import shown_settings

log = logging.getLogger(__name__)

#: Celery's inspect command that lists a worker's settings (Flower's Config tab).
CONF_INSPECT_COMMAND = "conf"


def chiffon_metrics(state: Any) -> dict[str, Any]:
    """The answer to ``inspect chiffon_metrics``: this agent's snapshot, now."""
    return get_agent().snapshot(heartbeat=False)


def chiffon_conf(state: Any, with_defaults: bool = False, **_: Any) -> dict[str, Any]:
    """The answer to ``inspect conf``: the app's settings (changed ones only, unless
    ``with_defaults``) as :func:`~.shown_settings.shown_settings` shows them."""
    return shown_settings(state.app.conf.table(with_defaults=with_defaults, censored=False))


def chiffon_drain(state: Any, requested_by: str = "unknown",
                  requested_at: float | None = None, **_: Any) -> dict[str, Any]:
    """Stop taking work from the pool queue (see the module docstring)."""
    config, intake = get_config(), get_agent().intake
    was_drained = intake.held_by(DRAIN) is not None
    mark = drain.DrainMark(time.time() if requested_at is None else float(requested_at),
                           str(requested_by))
    answer: dict[str, Any] = {"pool": config.agent_pool_name, "was_drained": was_drained}
    try:
        if drain.read_mark(config.state_dir) is None:  # a repeated drain keeps the first
            drain.write_mark(config.state_dir, mark)
        answer["persisted"] = True
    except OSError as exc:
        log.warning("drained, but the drain mark could not be kept in %s (%s): a restart "
                    "resumes pool work", config.state_dir, exc.strerror or exc)
        answer.update(persisted=False, error=str(exc.strerror or exc))
    if intake.stop(DRAINED_REASON, DRAIN):
        state.consumer.call_soon(drain.stop_consuming, state.consumer, config.agent_pool_name)
    log.info("drain requested by %s: finishing running work, no new work from %s",
             mark.requested_by, config.agent_pool_name)
    answer.update(ok=f"no longer consuming from {config.agent_pool_name}",
                  work_running=intake.work_running)
    return answer


def chiffon_undrain(state: Any, **_: Any) -> dict[str, Any]:
    """Take work from the pool queue again (see the module docstring)."""
    config, intake = get_config(), get_agent().intake
    answer: dict[str, Any] = {"pool": config.agent_pool_name,
                              "was_drained": intake.held_by(DRAIN) is not None}
    try:
        answer["was_drained"] = drain.remove_mark(config.state_dir) or answer["was_drained"]
        answer["persisted"] = True
    except OSError as exc:
        log.warning("undrained, but the drain mark in %s could not be removed (%s): a "
                    "restart drains the agent again", config.state_dir, exc.strerror or exc)
        answer.update(persisted=False, error=str(exc.strerror or exc))
    if intake.resume(DRAIN):
        state.consumer.call_soon(drain.resume_consuming, state.consumer,
                                 config.agent_pool_name)
        answer["ok"] = f"consuming from {config.agent_pool_name}"
    else:  # the owner rules still hold the pool queue: they resume it when they allow
        answer["ok"] = (f"undrained; not consuming from {config.agent_pool_name} while "
                        f"{intake.held_by(OWNER)}")
    answer["work_running"] = intake.work_running
    return answer


def register_control_commands() -> None:
    """Add the agent's inspect and control commands to Celery's remote-control table."""
    inspect_command(name=METRICS_INSPECT_COMMAND)(chiffon_metrics)
    inspect_command(name=CONF_INSPECT_COMMAND, alias="dump_conf",
                    signature="[include_defaults=False]",
                    args=[("with_defaults", strtobool)])(chiffon_conf)
    control_command(name=DRAIN_CONTROL_COMMAND, args=[("requested_by", str)],
                    signature="[requested_by]")(chiffon_drain)
    control_command(name=UNDRAIN_CONTROL_COMMAND)(chiffon_undrain)
