"""``chiffon.execute_work``: the task agents run.

It never raises for bad input: a malformed request becomes an error ``WorkResult``, so a
poison message is acknowledged once and never redelivered in a loop. Work the agent hands
back (the owner returned, ``owner_returns: requeue``) is rejected with requeue: the
broker delivers it again, to an agent that consumes the pool queue, and this run leaves
no result. (Agents only
*publish* ``chiffon.heartbeat``, see :mod:`.heartbeat_sender`; no agent runs it, so it is
not registered here.)
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery
from celery.exceptions import Reject

from chiffon_worker.errors import ProtocolError, WorkHandedBack
from chiffon_worker.protocol import WorkRequest, WorkResult
from chiffon_worker.wire import EXECUTE_WORK_TASK
from chiffon_worker.worker.runtime import get_agent, get_config

log = logging.getLogger(__name__)


def execute_work(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Validate the one argument (a WorkRequest as JSON text or object), run it on this
    process's agent, and return the ``WorkResult`` as a JSON object."""
    started = time.perf_counter()
    try:
        if len(args) != 1 or kwargs:
            raise ProtocolError(None, f"{EXECUTE_WORK_TASK} takes exactly one argument, the "
                                      f"request (got {len(args)} and {len(kwargs)} keywords)")
        request = WorkRequest.from_json(args[0])
    except ProtocolError as exc:
        log.warning("rejected malformed work request: %s", exc)
        return WorkResult.failure(_echoable_work_id(args, exc), f"malformed work request: {exc}",
                                  get_config().agent_id, time.perf_counter() - started).to_dict()
    agent = get_agent()
    with agent.intake.running() as handed_back:  # the heartbeat's work_running
        try:
            return agent.execute_work(request, handed_back).to_dict()
        except WorkHandedBack as exc:
            # the broker delivers the message again, to an agent that consumes the pool
            log.info("work %s handed back to the pool queue: %s", request.work_id, exc)
            raise Reject(str(exc), requeue=True) from None


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


def register_tasks(app: Celery) -> None:
    """Register the agent's tasks on ``app`` under their public names (on ``app`` only:
    Celery's default, a shared task, would also put them on every app created later in the
    process, such as a submitter's)."""
    app.task(name=EXECUTE_WORK_TASK, acks_late=True, reject_on_worker_lost=True,
             typing=False, shared=False)(execute_work)
