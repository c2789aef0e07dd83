"""The same agent on Redis as broker (and result backend): heartbeats and work.

Runs in its own Redis database so the shared ``chiffon.heartbeats`` list it fills (Redis
does not expire messages) can be deleted afterwards without touching anyone's db 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
import redis

from chiffon_worker.agents.desktop import STUB_OUTPUT
from chiffon_worker.protocol import SNAPSHOT_KEYS, WorkResult, validate_snapshot
from chiffon_worker.wire import HEARTBEAT_QUEUE
from tests.integration.conftest import WatchedAgent
from tests.integration.helpers import (
    HeartbeatTap,
    delete_agent_queues,
    start_agent,
    submit,
    unique,
    work_client,
)

pytestmark = pytest.mark.integration

REDIS_DB = 13


@pytest.fixture(scope="module")
def redis_agent(redis_url: str,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[WatchedAgent]:
    url = redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    agent_id = unique("t-agent")
    tap = HeartbeatTap(url, agent_id)
    agent = start_agent(tmp_path_factory.mktemp("redis-agent"), url, agent_id=agent_id)
    client = work_client(url, url)
    try:
        agent.wait_ready()
        yield WatchedAgent(agent, tap, client)
    finally:
        agent.stop()
        client.close()
        tap.delete()
        delete_agent_queues(url, agent.pool, agent.agent_queue, HEARTBEAT_QUEUE)
        redis.Redis.from_url(url).delete("unacked", "unacked_index", "unacked_mutex")


def test_heartbeats_on_redis_arrive_every_interval_with_consecutive_seq(
        redis_agent: WatchedAgent) -> None:
    beats = redis_agent.tap.wait_for(3, timeout=10)[-3:]
    assert len(beats) == 3
    seqs = [beat.snapshot["seq"] for beat in beats]
    assert seqs == list(range(seqs[0], seqs[0] + 3))
    gaps = [b.snapshot["collected_at"] - a.snapshot["collected_at"]
            for a, b in pairwise(beats)]
    assert all(0.5 <= gap <= 1.5 for gap in gaps), gaps


def test_heartbeats_on_redis_carry_a_valid_snapshot_of_the_agent(
        redis_agent: WatchedAgent) -> None:
    snapshot = redis_agent.tap.wait_for(1, timeout=10)[-1].snapshot
    assert (snapshot["agent_id"], snapshot["pool"]) == (
        redis_agent.agent.agent_id, redis_agent.agent.pool)
    assert set(SNAPSHOT_KEYS) <= set(snapshot)
    assert validate_snapshot(snapshot) == snapshot


def test_execute_work_on_redis_returns_the_stub_result(redis_agent: WatchedAgent) -> None:
    request = {"work_id": unique("w"), "work_type": "render", "payload": {}}
    result = WorkResult.from_json(submit(redis_agent.client, redis_agent.agent.pool, request))
    assert (result.status, result.output) == ("success", STUB_OUTPUT)


def test_agent_on_redis_leaves_no_schedule_file_in_the_working_directory(
        redis_agent: WatchedAgent, tmp_path: Path) -> None:
    redis_agent.tap.wait_for(2, timeout=10)
    assert list(redis_agent.agent.cwd.iterdir()) == []
