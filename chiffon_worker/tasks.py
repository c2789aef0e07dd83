"""Tasks: ``chiffon.execute_work`` (run by agents) and ``chiffon.heartbeat`` (run by the
orchestrator's consumer; agents only publish it).

``execute_work`` never raises for bad input: a malformed request becomes an error
``WorkResult``, so a poison message is acknowledged once and never redelivered in a loop.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery

from chiffon_worker.celery_settings import EXECUTE_WORK_TASK, HEARTBEAT_TASK
from chiffon_worker.errors import ProtocolError
from chiffon_worker.protocol import WorkRequest, WorkResult

log = logging.getLogger(__name__)


def execute_work(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Validate the one argument (a WorkRequest as JSON text or object), run it on this
    process's agent, and return the ``WorkResult`` as a JSON object."""
    from chiffon_worker.app import current_config
    from chiffon_worker.runtime import current_agent

    config = current_config()
    started = time.perf_counter()
    try:
        if len(args) != 1 or kwargs:
            raise ProtocolError(None, f"{EXECUTE_WORK_TASK} takes exactly one argument, the "
                                      f"request (got {len(args)} and {len(kwargs)} keywords)")
        request = WorkRequest.from_json(args[0])
    except ProtocolError as exc:
        log.warning("rejected malformed work request: %s", exc)
        return WorkResult.failure(_echoable_work_id(args, exc), f"malformed work request: {exc}",
                                  config.agent_id, time.perf_counter() - started).to_dict()
    result = current_agent(config).execute_work(request)
    return result.to_dict()


def _echoable_work_id(args: tuple[Any, ...], exc: ProtocolError) -> str:
    """The request's work_id for the error result, unless the work_id itself is bad."""
    raw = args[0] if len(args) == 1 else None
    work_id = raw.get("work_id") if isinstance(raw, dict) else None
    if exc.field == "work_id" or not isinstance(work_id, str):
        return ""
    try:
        WorkRequest(work_id, "probe")
    except ProtocolError:
        return ""
    return work_id


def heartbeat(snapshot: dict[str, Any]) -> dict[str, Any]:
    """Agents never run this: the orchestrator's consumer handles ``chiffon.heartbeat``
    messages. Defined so the name is known and a stray one is acknowledged harmlessly."""
    log.debug("heartbeat task seen outside the orchestrator (seq %s)",
              snapshot.get("seq") if isinstance(snapshot, dict) else None)
    return {"ignored": True}


def register(app: Celery) -> None:
    """Register the tasks on ``app`` under their public names (on ``app`` only: Celery's
    default, a shared task, would also put them on every app created later in the process,
    such as a submitter's)."""
    app.task(name=EXECUTE_WORK_TASK, acks_late=True, reject_on_worker_lost=True,
             typing=False, shared=False)(execute_work)
    app.task(name=HEARTBEAT_TASK, ignore_result=True, typing=False, shared=False)(heartbeat)
