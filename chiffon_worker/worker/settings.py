"""Every Celery setting of the agent, as a pure function of a chiffon ``Config``.

The app factory configures the app from :func:`celery_settings` directly, so nothing
in the working directory (a stray ``celeryconfig.py``, ``CELERY_CONFIG_MODULE``) can
replace these values. The queue layout is the contract of docs/design.md: the pool
queue (shared, durable, acks late, prefetch 1), this agent's own queue, and
``chiffon.heartbeats`` (published to, never consumed by the agent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kombu.entity import Queue

from chiffon_worker.config import Config
from chiffon_worker.wire import (
    EXECUTE_WORK_TASK,
    HEARTBEAT_QUEUE,
    HEARTBEAT_TASK,
    agent_queue_name,
    declared_queue,
    heartbeat_queue,
)
from chiffon_worker.worker.beat import HeartbeatScheduler
from chiffon_worker.worker.consumer import BROKER_HEARTBEAT_SECONDS, Consumer

#: Longest beat sleep (seconds): beat wakes at least this often to notice a stop.
BEAT_MAX_LOOP_SECONDS = 5.0


def work_queues(config: Config) -> list[Queue]:
    """The queues this agent consumes: its pool's shared queue and its own queue, both of
    ``config.queue_type`` (the agent's own queue too: a classic durable queue whose node is
    down cannot be declared on any other node, 404 "home node is down", so an agent of a
    cluster would stop consuming altogether)."""
    return [declared_queue(config.agent_pool_name, config.queue_type),
            declared_queue(agent_queue_name(config.agent_id), config.queue_type)]


def celery_settings(config: Config) -> dict[str, Any]:
    """Every Celery setting the agent uses, as a dict of lowercase Celery setting names."""
    state_dir = Path(config.state_dir)
    pool_queue = config.agent_pool_name
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
        "task_default_queue": pool_queue,
        "task_default_exchange": pool_queue,
        "task_default_routing_key": pool_queue,
        "task_routes": {
            # through the named exchange, not Celery's default-exchange shortcut for
            # direct queues, so more queues can be bound to receive copies of heartbeats
            HEARTBEAT_TASK: {"queue": heartbeat_queue(queue_type=config.queue_type),
                             "exchange": HEARTBEAT_QUEUE,
                             "routing_key": HEARTBEAT_QUEUE},
            EXECUTE_WORK_TASK: {"queue": pool_queue},
        },
        # a worker killed mid-task loses no work
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Only a process can be cancelled: with threads/solo the task runs on, its ack is
        # lost with the connection and the broker redelivers it (see consumer.AckLostFilter).
        "worker_cancel_long_running_tasks_on_connection_loss": config.worker_pool == "prefork",
        # the broker is retried forever, including at start
        "broker_connection_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_heartbeat": BROKER_HEARTBEAT_SECONDS,
        # Celery's default; fewer deadlocks Flower, whose parallel inspect calls (up to 8)
        # each hold two pooled connections at once
        "broker_pool_limit": 10,
        "broker_transport_options": {"visibility_timeout": 3600},
        "result_expires": 86400,
        "result_persistent": False,
        # Flower sees workers and tasks (heartbeats are sent without a task-sent event:
        # no Celery worker ever runs them; see heartbeat_sender)
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # a desktop agent: light pool, one slot by default
        "worker_pool": config.worker_pool,
        "worker_concurrency": config.worker_concurrency,
        "worker_hijack_root_logger": True,
        # no mingle/gossip: agents need no worker-to-worker chatter (faster start)
        "worker_consumer": Consumer,
        "worker_redirect_stdouts": False,
        # beat: in memory, heartbeats only; nothing written to the working directory
        "beat_scheduler": HeartbeatScheduler,
        "beat_schedule_filename": str(state_dir / "celerybeat-schedule"),
        "beat_max_loop_interval": max(0.5, min(BEAT_MAX_LOOP_SECONDS,
                                               config.heartbeat_interval_seconds)),
        "timezone": "UTC",
        "enable_utc": True,
        # beat is a thread of the worker: name the thread, so heartbeat lines say "Beat"
        "worker_log_format": "[%(asctime)s: %(levelname)s/%(processName)s/%(threadName)s] "
                             "%(message)s",
        # TLS (amqps://, rediss://): broker_use_ssl, redis_backend_use_ssl (broker_tls.py)
        **config.tls_to_broker.celery_settings(config.effective_broker_url,
                                               config.effective_result_backend),
    }
