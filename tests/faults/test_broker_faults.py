"""Broker faults under a working agent: the broker stopped for two intervals, stopped for a
long outage, and every connection cut while the node stays up.

Everything runs on a private RabbitMQ node this module starts, stops and cuts (the
machine's node on 5672 is never touched). Results go to Redis, which stays up: an
``rpc://`` reply queue would die with the broker. One agent (``celery -A chiffon_worker
worker -B``, heartbeat every second, one pool slot) lives through all three faults.

Each fault is one episode, run once and then judged by several tests:

- a long ``sleep`` is running when the fault hits (the item in flight);
- short ``sleep`` items wait in the pool queue behind it (sent before the fault);
- a fresh client publishes more while the broker is away, retrying until it is back
  (publisher confirms on, so a publish is never silently lost on a dead socket);
- more are sent once the broker is back.

What the user must see: the agent lives on, heartbeats resume within one interval of the
broker coming back, and every work item has exactly one result. ``execute_work`` acks
late, so the item in flight, whose acknowledgement the fault swallowed, is redelivered and
runs a second time: at-least-once, as designed. That rerun is the only one allowed, and it
shows in the agent's log (two "received" lines for one task id). "No duplicates" therefore
means: one result per work id in the result backend (the Celery task id is the work id),
every result carrying its own work id, and no item other than the one in flight run twice.

The long outage lasts ``CHIFFON_FAULT_LONG_OUTAGE_S`` seconds (default 60).
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from celery import Celery

from chiffon_worker.wire import EXECUTE_WORK_TASK
from tests.conftest import missing_service
from tests.integration import private_rabbit
from tests.integration.helpers import (
    Agent,
    Heartbeat,
    HeartbeatTap,
    close_client,
    queue_depth,
    start_agent,
    unique,
    work_client,
)

INTERVAL_S = 1.0
#: Scheduling slack on a loaded 2-core CI machine.
SLACK_S = 0.5
LONG_OUTAGE_S = float(os.environ.get("CHIFFON_FAULT_LONG_OUTAGE_S", "60"))

#: The first test of each episode pays for it (the long one: the outage and ~30 s more).
pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.timeout(max(300, LONG_OUTAGE_S + 240))]
SHORT_OUTAGE_S = 2 * INTERVAL_S
#: Redis database for results (the result keys are unique per work id, and forgotten).
RESULT_DB = 11
LONG_SLEEP_S = 2.0
SHORT_SLEEP_S = 0.3
BEFORE, DURING, AFTER = 3, 2, 2
#: Publishing during an outage retries about every 0.25 s for up to ~5 minutes.
PUBLISH_RETRY_POLICY: dict[str, Any] = {
    "max_retries": 1200, "interval_start": 0, "interval_step": 0.25, "interval_max": 0.25,
}
#: After the broker is back: the worker's own reconnect back-off (2 s growing to 30 s)
#: plus the work itself (the item in flight runs twice).
RESULTS_TIMEOUT_S = 75.0

STOPPED_SHORT = "broker-stopped-2-intervals"
STOPPED_LONG = f"broker-stopped-{LONG_OUTAGE_S:g}s"
CUT = "connections-cut"


@dataclass
class Rig:
    node: private_rabbit.PrivateRabbit
    agent: Agent
    tap: HeartbeatTap
    client: Celery
    backend_url: str


@dataclass
class Item:
    """One work item sent during an episode."""

    request: dict[str, Any]
    phase: str  # "in flight", "before", "during" or "after" the fault
    sent_at: float = 0.0  # time.time() when the publish returned (confirmed)

    @property
    def work_id(self) -> str:
        return str(self.request["work_id"])


@dataclass
class Episode:
    """What one fault did, as seen from outside the agent."""

    fault: str
    fault_at: float  # time.time() just before the fault
    fault_done_at: float  # the node is down (stop) or the cut was made (cut)
    back_at: float  # the node accepts connections again (stop) or the cut was made (cut)
    items: list[Item]
    results: dict[str, Any]  # work_id -> the task's result (a WorkResult as JSON)
    states: dict[str, str]  # work_id -> Celery state in the result backend
    heartbeats: list[Heartbeat]
    log: str  # the agent's log after the episode
    log_before: str  # the agent's log just before the fault
    alive: bool
    pool_depth: int  # ready messages left in the pool queue at the end
    errors: list[str] = field(default_factory=list)

    @property
    def in_flight(self) -> Item:
        return next(item for item in self.items if item.phase == "in flight")

    def executions(self) -> Counter[str]:
        """work_id -> how many times the agent started it (its "sleeping" lines)."""
        return Counter(re.findall(r"work (\S+): sleeping", self.log))

    def received(self, task_id: str) -> int:
        """How many times the worker logged receiving the task message ``task_id``."""
        return len(re.findall(rf"Task {re.escape(EXECUTE_WORK_TASK)}\[{re.escape(task_id)}\] "
                              r"received", self.log))


def configure_client(client: Celery) -> Celery:
    """Publisher confirms: a publish on a connection the broker dropped fails (and is
    retried) instead of vanishing into a dead socket."""
    client.conf.broker_transport_options = {"confirm_publish": True}
    return client


def sleep_request(seconds: float) -> dict[str, Any]:
    return {"work_id": unique("w"), "work_type": "sleep", "payload": {"seconds": seconds}}


def send(client: Celery, pool: str, item: Item) -> Item:
    """Publish ``item`` to ``pool`` (Celery task id = work id), retrying through outages."""
    client.send_task(EXECUTE_WORK_TASK, args=[item.request], queue=pool,
                     task_id=item.work_id, retry=True, retry_policy=PUBLISH_RETRY_POLICY)
    item.sent_at = time.time()
    return item


def drain_until(rig: Rig, pattern: str, count: int, timeout: float) -> None:
    """Keep the tap drained (its heartbeats expire) until the agent logged ``pattern``
    ``count`` times."""
    deadline = time.monotonic() + timeout
    while len(re.findall(pattern, rig.agent.log(), re.MULTILINE)) < count:
        if time.monotonic() > deadline or not rig.agent.alive:
            raise AssertionError(f"{pattern!r} not seen {count}x in the agent's log:\n"
                                 f"{rig.agent.log()}")
        rig.tap.drain(0.1)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Rig]:
    why_not = private_rabbit.available()
    if why_not:
        missing_service(f"private RabbitMQ node: {why_not}")
    backend_url = f"{redis_url.rsplit('/', 1)[0]}/{RESULT_DB}"
    node = private_rabbit.PrivateRabbit()
    agent: Agent | None = None
    tap: HeartbeatTap | None = None
    client: Celery | None = None
    try:
        node.start()
        agent_id = unique("t-agent")
        tap = HeartbeatTap(node.url, agent_id, durable=True)  # survives broker restarts
        agent = start_agent(tmp_path_factory.mktemp("broker-faults"), node.url,
                            agent_id=agent_id, interval=INTERVAL_S,
                            extra_env={"CHIFFON_RESULT_BACKEND": backend_url})
        client = configure_client(work_client(node.url, backend_url))
        agent.wait_ready()
        tap.wait_for(2, timeout=10)
        yield Rig(node, agent, tap, client, backend_url)
    finally:
        if agent is not None:
            agent.stop()
        if tap is not None:
            tap.close()
        if client is not None:
            close_client(client)
        node.destroy()  # the node, its queues and messages go away


def run_episode(rig: Rig, fault: str, outage_s: float) -> Episode:
    """Run one fault with work in flight, queued, published during it and after it."""
    agent, tap, client, pool = rig.agent, rig.tap, rig.client, rig.agent.pool
    long_item = Item(sleep_request(LONG_SLEEP_S), "in flight")
    before = [Item(sleep_request(SHORT_SLEEP_S), "before") for _ in range(BEFORE)]
    during = [Item(sleep_request(SHORT_SLEEP_S), "during") for _ in range(DURING)]
    after = [Item(sleep_request(SHORT_SLEEP_S), "after") for _ in range(AFTER)]
    items = [long_item, *before, *during, *after]
    errors: list[str] = []

    for item in (long_item, *before):
        send(client, pool, item)
    drain_until(rig, rf"work {long_item.work_id}: sleeping", 1, timeout=30)
    tap.drain(0.1)
    log_before = agent.log()
    fault_at = time.time()
    if fault == CUT:
        rig.node.cut_connections()
        fault_done_at = back_at = time.time()
    else:
        rig.node.stop()
        fault_done_at = time.time()

    def publish_during() -> None:
        # a fresh client: its first connection attempt meets the outage (or the cut node)
        during_client = configure_client(work_client(rig.node.url, rig.backend_url))
        try:
            for item in during:
                send(during_client, pool, item)
        except Exception as exc:  # reported by the tests, not lost in the thread
            errors.append(f"publishing during the outage failed: {exc!r}")
        finally:
            during_client.close()

    publisher = threading.Thread(target=publish_during, name="publish-during-outage")
    publisher.start()
    if fault != CUT:
        time.sleep(outage_s)
        rig.node.start()
        back_at = time.time()
    publisher.join(timeout=RESULTS_TIMEOUT_S)
    if publisher.is_alive():
        errors.append("publishing during the outage still blocked after the broker returned")
    for item in after:
        send(client, pool, item)

    results: dict[str, Any] = {}
    states: dict[str, str] = {}
    pending = {item.work_id: client.AsyncResult(item.work_id) for item in items}
    deadline = time.monotonic() + RESULTS_TIMEOUT_S
    while pending and time.monotonic() < deadline:
        for work_id, result in list(pending.items()):
            if result.ready():
                states[work_id], results[work_id] = result.state, result.result
                del pending[work_id]
        tap.drain(0.1)
    for work_id, result in pending.items():
        states[work_id] = result.state
    tap.drain(INTERVAL_S)  # one more heartbeat, and a moment for late reruns to log
    for item in items:
        client.AsyncResult(item.work_id).forget()
    return Episode(fault, fault_at, fault_done_at, back_at, items, results, states,
                   list(tap.received), agent.log(), log_before, agent.alive,
                   queue_depth(rig.node.url, pool), errors)


@pytest.fixture(scope="module")
def stopped_short(rig: Rig) -> Episode:
    return run_episode(rig, STOPPED_SHORT, SHORT_OUTAGE_S)


@pytest.fixture(scope="module")
def stopped_long(rig: Rig) -> Episode:
    return run_episode(rig, STOPPED_LONG, LONG_OUTAGE_S)


@pytest.fixture(scope="module")
def cut(rig: Rig) -> Episode:
    return run_episode(rig, CUT, 0.0)


@pytest.fixture(scope="module", params=[
    STOPPED_SHORT,
    pytest.param(STOPPED_LONG, marks=pytest.mark.slow),
    CUT,
])
def episode(request: pytest.FixtureRequest) -> Episode:
    """Each fault in turn (the long outage in the middle, the cut last)."""
    name = {STOPPED_SHORT: "stopped_short", STOPPED_LONG: "stopped_long", CUT: "cut"}
    result: Episode = request.getfixturevalue(name[request.param])
    return result


def test_the_agent_process_lives_through_the_fault_and_reconnects(episode: Episode) -> None:
    assert episode.alive, episode.log
    connected = r"Connected to amqp://guest:\*\*@127\.0\.0\.1:\d+//"
    assert len(re.findall(connected, episode.log)) > len(re.findall(connected,
                                                                    episode.log_before))


def test_heartbeats_resume_within_one_interval_of_the_broker_coming_back(
        episode: Episode) -> None:
    after = [beat for beat in episode.heartbeats
             if beat.snapshot["collected_at"] > episode.fault_done_at]
    assert after, f"no heartbeat after the fault:\n{episode.log}"
    first = min(after, key=lambda beat: beat.snapshot["collected_at"])
    delay = first.snapshot["collected_at"] - episode.back_at
    assert delay <= INTERVAL_S + SLACK_S, (
        f"first heartbeat {delay:.2f} s after the broker came back (seq "
        f"{first.snapshot['seq']})")


def test_heartbeats_keep_their_cadence_after_the_fault(episode: Episode) -> None:
    collected = sorted(beat.snapshot["collected_at"] for beat in episode.heartbeats
                       if beat.snapshot["collected_at"] > episode.back_at)
    assert len(collected) >= 3, "too few heartbeats after the fault to judge their cadence"
    gaps = [later - earlier for earlier, later in itertools.pairwise(collected)]
    assert max(gaps) <= INTERVAL_S + SLACK_S, gaps


def test_every_work_item_sent_before_during_and_after_the_fault_has_exactly_one_result(
        episode: Episode) -> None:
    assert not episode.errors, episode.errors
    sent = [item.work_id for item in episode.items]
    assert len(set(sent)) == len(sent) == 1 + BEFORE + DURING + AFTER
    missing = {item.work_id: item.phase for item in episode.items
               if episode.states.get(item.work_id) != "SUCCESS"}
    assert not missing, f"no result for {missing} (states {episode.states}):\n{episode.log}"
    # one result per work id (the task id is the work id), each for its own request
    assert sorted(result["work_id"] for result in episode.results.values()) == sorted(sent)
    for item in episode.items:
        result = episode.results[item.work_id]
        assert result["status"] == "success", result
        assert result["output"] == {"slept_seconds": item.request["payload"]["seconds"]}


def test_items_published_during_the_outage_waited_for_the_broker(episode: Episode) -> None:
    during = [item for item in episode.items if item.phase == "during"]
    assert all(item.sent_at >= episode.back_at for item in during), (
        "a publish during the outage returned before the broker was back: "
        f"{[(item.sent_at, episode.back_at) for item in during]}")


def test_only_the_item_in_flight_runs_twice_and_its_rerun_shows_in_the_log(
        episode: Episode) -> None:
    executions = episode.executions()
    in_flight = episode.in_flight.work_id
    for item in episode.items:
        expected = 2 if item.work_id == in_flight else 1
        assert executions[item.work_id] == expected, (
            f"{item.phase} item {item.work_id} ran {executions[item.work_id]}x, "
            f"expected {expected}x:\n{episode.log}")
    assert episode.received(in_flight) == 2, "the redelivery is not in the agent's log"


def test_the_item_in_flight_at_the_fault_is_redelivered_and_completed(episode: Episode) -> None:
    item = episode.in_flight
    assert item.work_id in episode.log_before  # it was running when the fault hit
    rerun = episode.log[len(episode.log_before):]
    assert f"work {item.work_id}: sleeping" in rerun, "the item in flight was not redelivered"
    assert re.search(rf"Task {re.escape(EXECUTE_WORK_TASK)}\[{item.work_id}\] succeeded",
                     rerun), f"the redelivered item did not complete:\n{episode.log}"
    assert episode.states[item.work_id] == "SUCCESS"
    assert episode.pool_depth == 0, "work left behind in the pool queue"


def test_a_fault_with_work_in_flight_logs_no_traceback_and_nothing_critical(
        episode: Episode) -> None:
    after_fault = episode.log[len(episode.log_before):]
    assert "Traceback" not in after_fault
    assert "CRITICAL" not in after_fault


def test_a_connection_cut_costs_no_heartbeat(cut: Episode) -> None:
    # A heartbeat whose confirm the cut swallowed may arrive twice (the publish is
    # retried on a fresh connection; or the tap's own ack was cut); the orchestrator
    # ignores a repeated seq. None may be missing.
    seqs = sorted({beat.snapshot["seq"] for beat in cut.heartbeats
                   if cut.fault_at - 3 * INTERVAL_S <= beat.snapshot["collected_at"]
                   <= cut.back_at + 3 * INTERVAL_S})
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert not re.search(r"heartbeat seq \d+ not sent", cut.log[len(cut.log_before):])


def test_the_agent_logs_each_heartbeat_lost_to_a_stopped_broker_and_its_return(
        stopped_short: Episode) -> None:
    outage_log = stopped_short.log[len(stopped_short.log_before):]
    lost = re.findall(r"cannot reach broker at amqp://guest:\*\*@127\.0\.0\.1:\d+//: "
                      r"[^;\n]+; heartbeat seq (\d+) not sent", outage_log)
    assert len(lost) >= SHORT_OUTAGE_S / INTERVAL_S, outage_log
    assert [int(seq) for seq in lost] == list(range(int(lost[0]), int(lost[0]) + len(lost)))
    assert re.search(r"broker reachable again after [\d.]+ s; heartbeats resumed", outage_log)

