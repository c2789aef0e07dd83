"""Celery settings derived from a :class:`~chiffon_worker.config.Config`.

A pure function, so ``celeryconfig.py`` and tests build the same settings. The queue
layout is the contract of DESIGN.md: the pool queue (shared, durable, acks late,
prefetch 1), this agent's own queue, and ``chiffon.heartbeats`` (published to, never
consumed by the agent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kombu.entity import Exchange, Queue

from chiffon_worker.config import Config

HEARTBEAT_QUEUE = "chiffon.heartbeats"
HEARTBEAT_TASK = "chiffon.heartbeat"
EXECUTE_WORK_TASK = "chiffon.execute_work"


def heartbeat_queue() -> Queue:
    """The durable queue heartbeats are published to (the orchestrator consumes it)."""
    return Queue(HEARTBEAT_QUEUE, Exchange(HEARTBEAT_QUEUE, type="direct"),
                 routing_key=HEARTBEAT_QUEUE, durable=True)


def work_queues(config: Config) -> list[Queue]:
    """The queues this agent consumes: its pool's shared queue and its own queue."""
    return [
        Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True)
        for name in (config.pool_queue, config.agent_queue)
    ]


def settings_from_config(config: Config) -> dict[str, Any]:
    """Every Celery setting the agent uses, as a dict of lowercase Celery setting names."""
    state_dir = Path(config.state_dir)
    return {
        "broker_url": config.effective_broker_url,
        "result_backend": config.effective_result_backend,
        # JSON only: pickle is refused on the way in and never used on the way out.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        # queues and routes
        "task_queues": work_queues(config),
        "task_default_queue": config.pool_queue,
        "task_default_exchange": config.pool_queue,
        "task_default_routing_key": config.pool_queue,
        "task_routes": {
            # through the named exchange, not Celery's default-exchange shortcut for
            # direct queues, so more queues can be bound to receive copies of heartbeats
            HEARTBEAT_TASK: {"queue": heartbeat_queue(), "exchange": HEARTBEAT_QUEUE,
                             "routing_key": HEARTBEAT_QUEUE},
            EXECUTE_WORK_TASK: {"queue": config.pool_queue},
        },
        # a worker killed mid-task loses no work
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Only a process can be cancelled: with threads/solo the task runs on, its ack is
        # lost with the connection and the broker redelivers it (see app.AckLostFilter).
        "worker_cancel_long_running_tasks_on_connection_loss": config.worker_pool == "prefork",
        # the broker is retried forever, including at start
        "broker_connection_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_heartbeat": 10,
        # Celery's default; fewer deadlocks Flower, whose parallel inspect calls (up to 8)
        # each hold two pooled connections at once
        "broker_pool_limit": 10,
        "broker_transport_options": {"visibility_timeout": 3600},
        "result_expires": 86400,
        "result_persistent": False,
        # Flower sees workers and tasks
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # a desktop agent: light pool, one slot by default
        "worker_pool": config.worker_pool,
        "worker_concurrency": config.worker_concurrency,
        "worker_hijack_root_logger": True,
        # no mingle/gossip: agents need no worker-to-worker chatter (faster start)
        "worker_consumer": "chiffon_worker.app:Consumer",
        "worker_redirect_stdouts": False,
        # beat: in memory, heartbeats only; nothing written to the working directory
        "beat_scheduler": "chiffon_worker.heartbeat_scheduler:HeartbeatScheduler",
        "beat_schedule_filename": str(state_dir / "celerybeat-schedule"),
        "beat_max_loop_interval": max(0.5, min(5.0, config.heartbeat_interval_seconds)),
        "timezone": "UTC",
        "enable_utc": True,
        # beat is a thread of the worker: name the thread, so heartbeat lines say "Beat"
        "worker_log_format": "[%(asctime)s: %(levelname)s/%(processName)s/%(threadName)s] "
                             "%(message)s",
    }
