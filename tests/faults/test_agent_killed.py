"""An agent killed with SIGKILL mid-``execute_work``: the work item goes to another agent.

Two real agents share one pool on the machine's RabbitMQ. The one that takes a long
``sleep`` work item is killed outright; the broker redelivers the unacknowledged message
(acks late) and the survivor finishes it, exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chiffon_worker.protocol import WorkRequest, WorkResult
from chiffon_worker.wire import EXECUTE_WORK_TASK
from tests.integration.helpers import (
    Agent,
    close_client,
    delete_agent_queues,
    start_agent,
    unique,
    work_client,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def two_agents_one_pool(tmp_path: Path, rabbitmq_url: str
                        ) -> Iterator[tuple[Agent, Agent, str]]:
    pool = unique("pool")
    agents = [start_agent(tmp_path / name, rabbitmq_url, interval=5, pool=pool)
              for name in ("a", "b")]
    try:
        for agent in agents:
            agent.wait_ready()
        yield agents[0], agents[1], pool
    finally:
        for agent in agents:
            agent.stop()
        delete_agent_queues(rabbitmq_url, pool, *(a.agent_queue for a in agents))


def test_work_of_a_killed_agent_is_redelivered_to_another_agent_of_the_pool(
        two_agents_one_pool: tuple[Agent, Agent, str], rabbitmq_url: str) -> None:
    first, second, pool = two_agents_one_pool
    client = work_client(rabbitmq_url, "rpc://")
    request = WorkRequest(unique("work"), "sleep", {"seconds": 4})
    result = client.send_task(EXECUTE_WORK_TASK, args=[request.to_dict()], queue=pool,
                              task_id=request.work_id)
    deadline = time.monotonic() + 20
    victim = survivor = None
    while time.monotonic() < deadline and victim is None:
        for agent, other in ((first, second), (second, first)):
            if f"work {request.work_id}: sleeping" in agent.log():
                victim, survivor = agent, other
        time.sleep(0.05)
    assert victim is not None and survivor is not None, "nobody took the work"
    victim.kill()
    outcome = WorkResult.from_json(result.get(timeout=30))
    assert outcome.status == "success"
    assert outcome.work_id == request.work_id
    assert outcome.agent_id == survivor.agent_id
    assert survivor.log().count(f"work {request.work_id}: sleeping") == 1
    close_client(client)
