"""Fixtures of the end-to-end tests: one agent on the machine's RabbitMQ shared by every
test that only watches it or sends it work (starting one costs ~1-2 s), a submitter,
and the classic in-process ``celery_worker`` fixture (pytest-celery 1.x replaced it with
a Docker-based one)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from celery import Celery
from celery.contrib.pytest import celery_worker  # noqa: F401 - the classic in-process worker

from tests.integration.helpers import (
    Agent,
    HeartbeatTap,
    close_client,
    delete_agent_queues,
    start_agent,
    unique,
    work_client,
)


@dataclass
class WatchedAgent:
    """An agent, a tap that has seen its heartbeats since before it started, a client."""

    agent: Agent
    tap: HeartbeatTap
    client: Celery


@pytest.fixture(scope="package")  # gone before other packages' tests run
def rabbit_agent(rabbitmq_url: str,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[WatchedAgent]:
    """``celery -A chiffon_worker worker -B`` on RabbitMQ, heartbeat every second."""
    tmp: Path = tmp_path_factory.mktemp("rabbit-agent")
    agent_id, pool = unique("t-agent"), unique("t-pool")
    tap = HeartbeatTap(rabbitmq_url, agent_id)  # bound before start: sees seq 1
    agent = start_agent(tmp, rabbitmq_url, agent_id=agent_id, pool=pool)
    client = work_client(rabbitmq_url, "rpc://")
    try:
        agent.wait_ready()
        yield WatchedAgent(agent, tap, client)
    finally:
        agent.stop()
        close_client(client)
        tap.delete()
        delete_agent_queues(rabbitmq_url, agent.pool, agent.agent_queue)
