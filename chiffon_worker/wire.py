"""Every name on the wire, declared once: exchanges, queues, task names, queue builders.

The agent (its Celery settings and heartbeat sender), the orchestrator (its heartbeat
consumer) and the router (``chiffon submit``) all build their queues here, so the three
always declare the same entities with the same arguments (RabbitMQ refuses a second
declaration that differs: ``PRECONDITION_FAILED``).

Every queue is durable, bound to a direct exchange of the same name with routing key =
queue name. Publishing through that named exchange (not Celery's default-exchange
shortcut) lets more queues bind to it and receive copies: tests and tools tap heartbeats
that way without taking them from the orchestrator.
"""

from __future__ import annotations

import re

from kombu.entity import Exchange, Queue

#: The queue (and exchange) heartbeats are published to; the orchestrator consumes it.
HEARTBEAT_QUEUE = "chiffon.heartbeats"
#: The task name a heartbeat message carries; its one argument is the snapshot.
HEARTBEAT_TASK = "chiffon.heartbeat"
#: The task agents run; its one argument is a ``WorkRequest``, its result a ``WorkResult``.
EXECUTE_WORK_TASK = "chiffon.execute_work"
#: Prefix of the queue only one agent consumes: ``chiffon.agent.<agent_id>``.
AGENT_QUEUE_PREFIX = "chiffon.agent."
#: Celery's event exchange (a topic exchange) and the routing keys of worker events
#: (``worker.online``, ``worker.heartbeat``, ``worker.offline``).
WORKER_EVENTS_EXCHANGE = "celeryev"
WORKER_EVENTS_ROUTING_KEY = "worker.#"
#: Prefix of the orchestrator's private worker-event queue (``<prefix><id>.<time>``).
ORCHESTRATOR_EVENTS_QUEUE_PREFIX = "chiffon.orchestrator.events."
#: Routing key of Celery's task events (task-received, -started, -succeeded, -failed...).
TASK_EVENTS_ROUTING_KEY = "task.#"
#: Celery's remote-control mailbox (its fanout exchange is ``celery.pidbox``) and its
#: built-in command that makes every worker send a ``worker-heartbeat`` event at once.
CONTROL_MAILBOX = "celery"
HEARTBEAT_CONTROL_COMMAND = "heartbeat"
#: The name of the ``celery inspect`` command that answers with an agent's snapshot.
METRICS_INSPECT_COMMAND = "chiffon_metrics"
#: The ``celery control`` commands that stop and resume an agent's consumption of its pool
#: queue (``chiffon drain`` / ``chiffon undrain``); its own queue is never touched.
DRAIN_CONTROL_COMMAND = "chiffon_drain"
UNDRAIN_CONTROL_COMMAND = "chiffon_undrain"
#: ``accepting_reason`` of an agent an operator drained.
DRAINED_REASON = "drained"

#: What RabbitMQ and Redis both accept as a queue name here (ids are checked tighter).
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


def is_queue_name(name: str) -> bool:
    """Whether ``name`` may be used as a queue name (1-255 of letters, digits, ``._-``)."""
    return bool(_QUEUE_NAME.match(name))


def agent_queue_name(agent_id: str) -> str:
    """The queue only ``agent_id`` consumes."""
    return AGENT_QUEUE_PREFIX + agent_id


#: RabbitMQ queue types of the durable queues (config key ``queue_type``): ``classic``
#: (one node holds the queue) or ``quorum`` (replicated on every node of a cluster by Raft;
#: survives the loss of a minority of nodes). Queues that are exclusive or auto-delete
#: (reply queues, event queues, taps) are always classic: quorum queues cannot be either.
CLASSIC_QUEUE = "classic"
QUORUM_QUEUE = "quorum"


def declared_queue(name: str, queue_type: str = CLASSIC_QUEUE) -> Queue:
    """Queue ``name`` as every part declares it: durable, direct exchange of the same name;
    ``queue_type`` ``quorum`` adds ``x-queue-type: quorum`` (``classic`` declares no type
    argument, exactly as before the key existed, so existing queues stay equivalent)."""
    arguments = {"x-queue-type": QUORUM_QUEUE} if queue_type == QUORUM_QUEUE else None
    return Queue(name, Exchange(name, type="direct", durable=True), routing_key=name,
                 durable=True, queue_arguments=arguments)


#: Prefix of a copy queue named after the registry it fills (``--copy``).
HEARTBEAT_COPY_PREFIX = "chiffon.heartbeats.copy."
#: A copy queue nobody consumes is deleted by the broker after this long (milliseconds:
#: a week), so a retired second registry does not collect heartbeats for ever.
HEARTBEAT_COPY_EXPIRES_MS = 7 * 86400 * 1000


def heartbeat_copy_queue(name: str) -> Queue:
    """A queue of its own receiving a copy of every heartbeat: bound to the heartbeat
    exchange (where agents publish) with the heartbeat routing key, so it takes nothing
    from ``chiffon.heartbeats`` or from any other copy. Deleted by the broker after a
    week unused; heartbeats in it expire as in the main queue."""
    return Queue(name, Exchange(HEARTBEAT_QUEUE, type="direct", durable=True),
                 routing_key=HEARTBEAT_QUEUE, durable=True,
                 queue_arguments={"x-expires": HEARTBEAT_COPY_EXPIRES_MS})


def heartbeat_queue(name: str = HEARTBEAT_QUEUE, queue_type: str = CLASSIC_QUEUE) -> Queue:
    """The heartbeat queue (``name`` differs only in tests and taps). Heartbeats expire by
    per-message TTL (Celery's ``expires``), which quorum queues honour too (RabbitMQ 3.10+)."""
    return declared_queue(name, queue_type)
