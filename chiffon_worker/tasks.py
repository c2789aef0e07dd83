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


def execute_work(raw_request: Any) -> dict[str, Any]:
    """Validate ``raw_request`` (a WorkRequest as JSON text or object), run it on this
    process's agent, and return the ``WorkResult`` as a JSON object."""
    from chiffon_worker.app import current_config
    from chiffon_worker.runtime import current_agent

    config = current_config()
    started = time.perf_counter()
    try:
        request = WorkRequest.from_json(raw_request)
    except ProtocolError as exc:
        work_id = raw_request.get("work_id") if isinstance(raw_request, dict) else None
        log.warning("rejected malformed work request: %s", exc)
        return WorkResult.failure(work_id if isinstance(work_id, str) else "",
                                  f"malformed work request: {exc}", config.agent_id,
                                  time.perf_counter() - started).to_dict()
    result = current_agent(config).execute_work(request)
    return result.to_dict()


def heartbeat(snapshot: dict[str, Any]) -> dict[str, Any]:
    """Agents never run this: the orchestrator's consumer handles ``chiffon.heartbeat``
    messages. Defined so the name is known and a stray one is acknowledged harmlessly."""
    log.debug("heartbeat task seen outside the orchestrator (seq %s)",
              snapshot.get("seq") if isinstance(snapshot, dict) else None)
    return {"ignored": True}


def register(app: Celery) -> None:
    """Register the tasks on ``app`` under their public names."""
    app.task(name=EXECUTE_WORK_TASK, acks_late=True, reject_on_worker_lost=True,
             typing=False)(execute_work)
    app.task(name=HEARTBEAT_TASK, ignore_result=True, typing=False)(heartbeat)
