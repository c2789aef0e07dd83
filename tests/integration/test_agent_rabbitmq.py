"""The agent as users run it — ``celery -A chiffon_worker worker -B``, no other flags — on
the machine's RabbitMQ: heartbeats, queues, work, and what it refuses."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import uuid
from itertools import pairwise
from pathlib import Path

import pytest
from amqp.exceptions import PreconditionFailed  # type: ignore[import-untyped]
from kombu.connection import Connection

from chiffon_worker.agents.desktop import STUB_OUTPUT
from chiffon_worker.protocol import SNAPSHOT_KEYS, WorkResult, validate_snapshot
from chiffon_worker.wire import EXECUTE_WORK_TASK, HEARTBEAT_TASK
from tests.integration.conftest import WatchedAgent
from tests.integration.helpers import (
    CELERY,
    TEST_HEARTBEAT_TIMEOUT_S,
    agent_environment,
    delete_agent_queues,
    queue_consumers,
    queue_depth,
    start_agent,
    submit,
    unique,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

INTERVAL_S = 1.0
#: Scheduling slack on a loaded 2-core CI machine.
SLACK_S = 0.5
#: Spawning the agent to its first heartbeat on the broker (target 2 s, plus CI slack).
START_TO_HEARTBEAT_S = 3.0


def _request(work_type: str = "render", **payload: object) -> dict[str, object]:
    return {"work_id": unique("w"), "work_type": work_type, "payload": payload}


# -- heartbeats ---------------------------------------------------------------------------


def test_heartbeats_arrive_every_interval_with_consecutive_seq(
        rabbit_agent: WatchedAgent) -> None:
    beats = rabbit_agent.tap.wait_for(3, timeout=10)[-3:]
    assert len(beats) == 3
    seqs = [beat.snapshot["seq"] for beat in beats]
    assert seqs == list(range(seqs[0], seqs[0] + 3))
    gaps = [b.snapshot["collected_at"] - a.snapshot["collected_at"]
            for a, b in pairwise(beats)]
    assert all(INTERVAL_S - SLACK_S <= gap <= INTERVAL_S + SLACK_S for gap in gaps), gaps


def test_heartbeats_name_the_agent_and_its_pool(rabbit_agent: WatchedAgent) -> None:
    beat = rabbit_agent.tap.wait_for(1, timeout=10)[-1]
    assert beat.snapshot["agent_id"] == rabbit_agent.agent.agent_id
    assert beat.snapshot["pool"] == rabbit_agent.agent.pool


def test_heartbeat_snapshot_has_every_key_and_passes_validation(
        rabbit_agent: WatchedAgent) -> None:
    snapshot = rabbit_agent.tap.wait_for(1, timeout=10)[-1].snapshot
    assert set(SNAPSHOT_KEYS) <= set(snapshot)
    assert validate_snapshot(snapshot) == snapshot


def test_first_heartbeat_is_sent_at_start(rabbit_agent: WatchedAgent) -> None:
    first = rabbit_agent.tap.wait_for(1, timeout=10)[0]
    assert first.snapshot["seq"] == 1
    # measured ~0.5 s from spawning the process (bench/heartbeat.py); slack for CI
    assert first.received_at - rabbit_agent.agent.spawned_at <= START_TO_HEARTBEAT_S


def test_heartbeat_is_the_heartbeat_task_with_the_snapshot_as_only_argument(
        rabbit_agent: WatchedAgent) -> None:
    beat = rabbit_agent.tap.wait_for(1, timeout=10)[-1]
    assert beat.headers["task"] == HEARTBEAT_TASK
    assert (beat.args, beat.kwargs) == ([beat.snapshot], {})


def test_heartbeat_headers_do_not_repeat_the_snapshot(rabbit_agent: WatchedAgent) -> None:
    beat = rabbit_agent.tap.wait_for(1, timeout=10)[-1]
    assert (beat.headers["argsrepr"], beat.headers["kwargsrepr"]) == ("(snapshot,)", "{}")


def test_heartbeat_message_expires_after_heartbeat_timeout(
        rabbit_agent: WatchedAgent) -> None:
    beat = rabbit_agent.tap.wait_for(1, timeout=10)[-1]
    assert beat.properties["expiration"] == str(TEST_HEARTBEAT_TIMEOUT_S * 1000)


def test_heartbeats_stay_on_schedule_while_every_pool_slot_is_busy(
        rabbit_agent: WatchedAgent) -> None:
    agent, tap = rabbit_agent.agent, rabbit_agent.tap
    request = _request("sleep", seconds=5)
    pending = rabbit_agent.client.send_task(EXECUTE_WORK_TASK, args=[request],
                                            queue=agent.pool)
    agent.wait_for_log(rf"work {request['work_id']}: sleeping", timeout=10)
    window_start = time.time()
    tap.drain(3.0)
    window_end = time.time()
    still_busy = not pending.ready()
    beats = [b for b in tap.received if window_start <= b.received_at <= window_end]
    pending.get(timeout=15)
    assert still_busy
    times = [window_start, *(b.received_at for b in beats), window_end]
    gaps = [b - a for a, b in pairwise(times)]
    assert len(beats) >= 2 and max(gaps) <= INTERVAL_S + SLACK_S, gaps


# -- queues -------------------------------------------------------------------------------


def test_worker_consumes_exactly_the_pool_and_agent_queues(
        rabbit_agent: WatchedAgent) -> None:
    agent = rabbit_agent.agent
    replies = rabbit_agent.client.control.inspect(
        destination=[agent.nodename], timeout=5).active_queues()
    assert replies is not None
    assert {queue["name"] for queue in replies[agent.nodename]} == {
        agent.pool, agent.agent_queue}


def test_pool_queue_is_durable(rabbit_agent: WatchedAgent, rabbitmq_url: str) -> None:
    with Connection(rabbitmq_url) as conn, pytest.raises(PreconditionFailed):
        # redeclaring with other arguments fails: the broker holds it durable
        conn.channel().queue_declare(rabbit_agent.agent.pool, durable=False)


def test_worker_is_named_after_the_agent(rabbit_agent: WatchedAgent) -> None:
    agent = rabbit_agent.agent
    assert agent.nodename == f"{agent.agent_id}@{socket.gethostname()}"


def test_worker_starts_without_mingle_or_gossip(rabbit_agent: WatchedAgent) -> None:
    log = rabbit_agent.agent.log()
    assert " ready." in log
    assert "mingle" not in log and "gossip" not in log


def test_beat_leaves_no_schedule_file_in_the_working_directory(
        rabbit_agent: WatchedAgent) -> None:
    rabbit_agent.tap.wait_for(2, timeout=10)
    assert list(rabbit_agent.agent.cwd.iterdir()) == []


def test_a_second_agent_in_the_same_pool_shares_the_pool_queue(
        rabbit_agent: WatchedAgent, rabbitmq_url: str, tmp_path: Path) -> None:
    second = start_agent(tmp_path, rabbitmq_url, pool=rabbit_agent.agent.pool)
    try:
        second.wait_ready()
        assert queue_consumers(rabbitmq_url, rabbit_agent.agent.pool) == 2
        assert queue_consumers(rabbitmq_url, second.agent_queue) == 1
    finally:
        second.stop()
        delete_agent_queues(rabbitmq_url, second.agent_queue)


# -- work ---------------------------------------------------------------------------------


def test_execute_work_on_the_pool_queue_returns_the_stub_result(
        rabbit_agent: WatchedAgent) -> None:
    request = _request()
    result = WorkResult.from_json(submit(rabbit_agent.client, rabbit_agent.agent.pool,
                                         request))
    assert (result.work_id, result.status, result.output, result.agent_id) == (
        request["work_id"], "success", STUB_OUTPUT, rabbit_agent.agent.agent_id)


def test_execute_work_on_the_agent_queue_is_run_by_that_agent(
        rabbit_agent: WatchedAgent) -> None:
    result = WorkResult.from_json(submit(rabbit_agent.client,
                                         rabbit_agent.agent.agent_queue, _request()))
    assert (result.status, result.agent_id) == ("success", rabbit_agent.agent.agent_id)


def test_malformed_work_request_returns_an_error_result(rabbit_agent: WatchedAgent) -> None:
    raw = submit(rabbit_agent.client, rabbit_agent.agent.pool, '{"work_id": "x", "payload"')
    result = WorkResult.from_json(raw)
    assert result.status == "error" and "malformed work request" in (result.error or "")


def test_worker_keeps_serving_after_a_malformed_request(rabbit_agent: WatchedAgent) -> None:
    pool = rabbit_agent.agent.pool
    submit(rabbit_agent.client, pool, {"work_type": 42})
    assert WorkResult.from_json(submit(rabbit_agent.client, pool, _request())).status \
        == "success"
    assert queue_depth(rabbit_agent.agent.broker_url, pool) == 0


def test_next_request_waits_on_the_pool_queue_while_the_only_slot_is_busy(
        rabbit_agent: WatchedAgent) -> None:
    agent, client = rabbit_agent.agent, rabbit_agent.client
    busy = _request("sleep", seconds=2)
    first = client.send_task(EXECUTE_WORK_TASK, args=[busy], queue=agent.pool)
    agent.wait_for_log(rf"work {busy['work_id']}: sleeping", timeout=10)
    second = client.send_task(EXECUTE_WORK_TASK, args=[_request()], queue=agent.pool)
    # prefetch 1: the message stays ready in the queue, for another agent of the pool to
    # take (an agent prefetching more would have it delivered at once, never ready)
    try:
        wait_until(lambda: queue_depth(agent.broker_url, agent.pool) == 1, 10,
                   "the second request to wait, ready, in the pool queue")
        still_busy = not first.ready()
    finally:  # the shared agent is left idle for the next test either way
        first.get(timeout=10)
        second.get(timeout=10)
    assert still_busy  # it was seen waiting while the slot was busy, not after


def test_pickle_message_is_refused_and_the_worker_keeps_serving(
        rabbit_agent: WatchedAgent, rabbitmq_url: str) -> None:
    agent = rabbit_agent.agent
    task_id = str(uuid.uuid4())
    with Connection(rabbitmq_url) as conn:
        conn.Producer().publish(
            ((_request(),), {}, {}), serializer="pickle", exchange="",
            routing_key=agent.pool, headers={"lang": "py", "task": EXECUTE_WORK_TASK,
                                             "id": task_id, "root_id": task_id})
    agent.wait_for_log(r"Refusing to deserialize untrusted content of type pickle", timeout=10)
    assert WorkResult.from_json(submit(rabbit_agent.client, agent.pool, _request())).status \
        == "success"
    assert queue_depth(rabbitmq_url, agent.pool) == 0
    assert agent.alive


def test_task_message_with_a_broken_envelope_is_dropped_and_the_worker_keeps_serving(
        rabbit_agent: WatchedAgent, rabbitmq_url: str) -> None:
    agent = rabbit_agent.agent
    task_id = str(uuid.uuid4())
    with Connection(rabbitmq_url) as conn:  # body not [args, kwargs, embed]: Celery crashes
        conn.Producer().publish(
            b"null", content_type="application/json", content_encoding="utf-8",
            exchange="", routing_key=agent.pool,
            headers={"lang": "py", "task": EXECUTE_WORK_TASK, "id": task_id})
    agent.wait_for_log(rf"dropped a malformed task message .*'{task_id}'", timeout=10)
    assert WorkResult.from_json(submit(rabbit_agent.client, agent.pool, _request())).status \
        == "success"
    assert queue_depth(rabbitmq_url, agent.pool) == 0
    assert agent.alive


def test_work_of_a_worker_killed_mid_task_goes_back_to_the_pool_queue(
        rabbit_agent: WatchedAgent, rabbitmq_url: str, tmp_path: Path) -> None:
    victim = start_agent(tmp_path, rabbitmq_url)
    try:
        victim.wait_ready()
        request = _request("sleep", seconds=30)
        sent = rabbit_agent.client.send_task(EXECUTE_WORK_TASK, args=[request],
                                             queue=victim.pool)
        victim.wait_for_log(rf"work {request['work_id']}: sleeping", timeout=10)
        assert queue_depth(rabbitmq_url, victim.pool) == 0  # delivered, not yet acked
        victim.kill()
        wait_until(lambda: queue_depth(rabbitmq_url, victim.pool) == 1, 10,
                   "the broker to requeue the killed worker's message")
        with Connection(rabbitmq_url) as conn:
            message = conn.SimpleQueue(victim.pool).get(timeout=5)
            message.ack()
        assert message.headers["id"] == sent.id
    finally:
        victim.stop()
        delete_agent_queues(rabbitmq_url, victim.pool, victim.agent_queue)


# -- remote control -----------------------------------------------------------------------


def test_inspect_chiffon_metrics_returns_the_agents_current_snapshot(
        rabbit_agent: WatchedAgent, tmp_path: Path) -> None:
    agent = rabbit_agent.agent
    env = agent_environment(tmp_path, {"CHIFFON_BROKER_URL": agent.broker_url,
                                       "CHIFFON_AGENT_ID": unique("t-cli")})
    done = subprocess.run(
        [str(CELERY), "-A", "chiffon_worker", "inspect", "chiffon_metrics",
         "-d", agent.nodename, "--timeout", "5", "--json"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    replies = json.loads(done.stdout)
    snapshot = replies[agent.nodename]
    assert snapshot["agent_id"] == agent.agent_id and snapshot["seq"] == 0
    assert validate_snapshot(snapshot)
