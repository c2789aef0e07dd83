"""Broker outages, on a private RabbitMQ node this module starts, stops and cuts (the
machine's node on 5672 is never touched).

The agent is started before its broker exists, so the module begins with the outage at
start; later tests restart the node and cut its connections.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from chiffon_worker.wire import EXECUTE_WORK_TASK
from tests.conftest import missing_service
from tests.integration import private_rabbit
from tests.integration.helpers import (
    Agent,
    HeartbeatTap,
    close_client,
    queue_depth,
    start_agent,
    unique,
    work_client,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INTERVAL_S = 1.0
#: Scheduling slack on a loaded 2-core CI machine.
SLACK_S = 0.5


@dataclass
class Outage:
    node: private_rabbit.PrivateRabbit
    agent: Agent
    tap: HeartbeatTap
    node_up_at: float  # time.time() when the node first accepted connections


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outage]:
    why_not = private_rabbit.available()
    if why_not:
        missing_service(f"private RabbitMQ node: {why_not}")
    node = private_rabbit.PrivateRabbit()
    agent = start_agent(tmp_path_factory.mktemp("outage"), node.url)
    tap: HeartbeatTap | None = None
    try:
        # the agent runs while its broker does not exist yet: both sides keep trying
        agent.wait_for_log(r"consumer: Cannot connect to [^\n]*\s+Trying again in", count=2)
        agent.wait_for_log(r"cannot reach broker at .*retrying in", count=2)
        node.start()
        node_up_at = time.time()
        tap = HeartbeatTap(node.url, agent.agent_id, durable=True)  # survives restarts
        agent.wait_ready()
        yield Outage(node, agent, tap, node_up_at)
    finally:
        agent.stop()
        if tap is not None:
            tap.close()
        node.destroy()  # the node and everything on it go away


def test_worker_logs_each_attempt_to_reach_a_broker_that_is_down_at_start(
        outage: Outage) -> None:
    attempts = re.findall(r"consumer: Cannot connect to (\S+): \[Errno 111\] Connection "
                          r"refused\.\s+Trying again in ([\d.]+) seconds", outage.agent.log())
    assert len(attempts) >= 2
    assert {url for url, _ in attempts} == {
        f"amqp://guest:**@127.0.0.1:{outage.node.port}//"}
    delays = [float(delay) for _, delay in attempts]
    assert delays == sorted(delays) and delays[-1] > delays[0]  # backing off


def test_beat_logs_each_heartbeat_it_cannot_send_while_the_broker_is_down(
        outage: Outage) -> None:
    failures = re.findall(r"cannot reach broker at (\S+): connection refused; heartbeat "
                          r"seq (\d+) not sent; retrying in 1 s", outage.agent.log())
    assert len(failures) >= 2
    assert {url for url, _ in failures} == {
        f"amqp://guest:**@127.0.0.1:{outage.node.port}//"}
    seqs = [int(seq) for _, seq in failures]
    assert seqs[:2] == [1, 2]


def test_secrets_never_appear_in_the_log(outage: Outage) -> None:
    assert "guest:guest" not in outage.agent.log()


def test_heartbeats_flow_once_a_broker_that_was_down_at_start_comes_up(
        outage: Outage) -> None:
    beats = outage.tap.wait_for(2, timeout=10)
    assert len(beats) >= 2
    assert beats[0].snapshot["collected_at"] <= outage.node_up_at + 2 * INTERVAL_S + SLACK_S


def test_heartbeats_resume_within_one_interval_of_a_broker_restart(outage: Outage) -> None:
    tap = outage.tap
    tap.wait_for(1, timeout=10)
    last_seq = tap.received[-1].snapshot["seq"]
    outage.node.stop()
    outage.agent.wait_for_log(rf"heartbeat seq {last_seq + 2} not sent", timeout=10)
    outage.node.start()
    back_at = time.time()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
            beat.snapshot["seq"] > last_seq + 2 for beat in tap.received):
        tap.drain(0.2)
    after = [beat for beat in tap.received if beat.snapshot["seq"] > last_seq + 2]
    assert after, outage.agent.log()
    assert after[0].snapshot["collected_at"] - back_at <= INTERVAL_S + SLACK_S
    outage.agent.wait_for_log(r"broker reachable again after [\d.]+ s; heartbeats resumed",
                              count=2)


def test_long_task_cut_off_by_a_connection_loss_is_redelivered_and_completed(
        outage: Outage) -> None:
    agent = outage.agent
    agent.wait_for_log(r"Connected to amqp://", count=2)  # back after the restart test
    client = work_client(outage.node.url, "rpc://")
    try:
        request = {"work_id": unique("w"), "work_type": "sleep", "payload": {"seconds": 2}}
        task_id = client.send_task(EXECUTE_WORK_TASK, args=[request], queue=agent.pool).id
        agent.wait_for_log(rf"work {request['work_id']}: sleeping", timeout=15)
        outage.node.cut_connections()
        agent.wait_for_log(rf"work {request['work_id']}: sleeping", timeout=20, count=2)
        agent.wait_for_log(rf"Task {EXECUTE_WORK_TASK}\[{task_id}\] succeeded", timeout=20,
                           count=2)
        deadline = time.monotonic() + 10
        while queue_depth(outage.node.url, agent.pool) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert queue_depth(outage.node.url, agent.pool) == 0
    finally:
        close_client(client)
