"""The orchestrator down for several intervals while an agent runs: the agent carries on,
the broker drops the heartbeats nobody consumes once they expire, and when the
orchestrator returns its registry is right.

Runs on the machine's RabbitMQ in a virtual host of its own, so its ``chiffon.heartbeats``
queue is private (other tests' agents publish to the one in ``/``, which is left alone),
with the real ``chiffon orchestrator`` (its own state dir, SQLite registry, no /metrics
port) and the real agent (heartbeat every 1 s, timeout 3 s).

What docs/orchestrator.md promises for the registry: ``seq`` is the newest accepted
heartbeat's; "``seq`` jumps ahead -> recorded; the skipped numbers are added to
``missed``"; a restart is a new ``boot_id`` (or a later ``started_at``), so an
orchestrator restart is not an agent restart; online means the newest heartbeat is
younger than the agent's ``heartbeat_timeout_seconds``.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest

from chiffon_worker.orchestrator.registry import AgentRecord, Registry
from chiffon_worker.wire import HEARTBEAT_QUEUE
from tests.conftest import missing_service as unavailable
from tests.integration.helpers import (
    Agent,
    Heartbeat,
    HeartbeatTap,
    agent_environment,
    queue_depth,
    start_agent,
    unique,
)
from tests.orchestrator_process import (
    CHIFFON,
    Orchestrator,
    VhostUnavailable,
    private_vhost,
    start_orchestrator,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INTERVAL_S = 1.0
TIMEOUT_S = 3.0
#: The consumer stays down this long: several intervals, and well past the timeout, so
#: some heartbeats expire in the queue and some are still there when it returns.
DOWN_S = 8.0
#: Scheduling slack on a loaded 2-core CI machine.
SLACK_S = 0.5
#: Heartbeats published this close to the expiry boundary may go either way.
EXPIRY_MARGIN_S = 0.75
START_TIMEOUT_S = 30.0


@dataclass
class ConsumerOutage:
    agent: Agent
    agent_log: str
    heartbeats: list[Heartbeat]  # the tap's copies of the agent's heartbeats
    down_at: float  # time.time() when the first orchestrator had exited
    back_at: float  # time.time() when the second one was consuming again
    seq_at_down: int  # the registry's seq for the agent when the consumer went down
    depths: list[tuple[float, int]]  # (time.time(), messages ready) while it was down
    status: dict[str, Any]  # the agent in `chiffon status --json` after the return
    newest_before_status: int  # the newest seq the tap had seen before that status
    newest_after_status: int  # ... and right after it
    record: AgentRecord  # the registry row, read right after that status
    orchestrator_log: str  # the second orchestrator's log
    exit_codes: tuple[int, int]


def _newest_seq(tap: HeartbeatTap) -> int:
    return max((beat.snapshot["seq"] for beat in tap.received), default=0)


def _wait(tap: HeartbeatTap, condition: Any, timeout: float, what: str) -> None:
    """Drain the tap (its copies expire too) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        tap.drain(0.1)


@pytest.fixture(scope="module")
def outage(rabbitmq_url: str, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ConsumerOutage]:
    with ExitStack() as stack:  # the vhost goes last, with its queues and exchanges
        try:
            url = stack.enter_context(private_vhost(rabbitmq_url))
        except VhostUnavailable as exc:
            unavailable(str(exc))
        tmp = tmp_path_factory.mktemp("consumer-down")
        agent: Agent | None = None
        tap: HeartbeatTap | None = None
        orchestrators: list[Orchestrator] = []
        try:
            state = tmp / "orchestrator-state"
            env = agent_environment(tmp / "orchestrator-home", {
                "CHIFFON_BROKER_URL": url, "CHIFFON_STATE_DIR": str(state),
                "CHIFFON_LOG_LEVEL": "INFO"})

            def start(n: int) -> Orchestrator:
                orchestrator = start_orchestrator(env, tmp / f"orchestrator-{n}.log")
                orchestrators.append(orchestrator)
                return orchestrator

            def consuming(orchestrator: Orchestrator) -> bool:
                assert orchestrator.popen.poll() is None, orchestrator.log()
                return f"consuming {HEARTBEAT_QUEUE} on" in orchestrator.log()

            first = start(1)
            deadline = time.monotonic() + START_TIMEOUT_S
            while not consuming(first):
                assert time.monotonic() < deadline, first.log()
                time.sleep(0.05)
            registry = Registry(f"sqlite:///{state / 'registry.sqlite3'}")
            agent_id = unique("t-agent")

            def stored_seq() -> int:
                record = registry.agent(agent_id, with_snapshot=False)
                return record.seq if record is not None else 0

            tap = HeartbeatTap(url, agent_id)  # bound before the agent starts: sees seq 1
            agent = start_agent(tmp, url, agent_id=agent_id, interval=INTERVAL_S,
                                extra_env={"CHIFFON_HEARTBEAT_TIMEOUT_SECONDS": f"{TIMEOUT_S:g}"})
            agent.wait_ready()
            _wait(tap, lambda: stored_seq() >= 3, 20, "3 heartbeats in the registry")

            first_exit = first.stop()
            down_at = time.time()
            seq_at_down = stored_seq()
            depths: list[tuple[float, int]] = []
            while time.time() < down_at + DOWN_S:
                tap.drain(0.2)
                depths.append((time.time(), queue_depth(url, HEARTBEAT_QUEUE)))

            second = start(2)
            _wait(tap, lambda: consuming(second), START_TIMEOUT_S, "the orchestrator to return")
            back_at = time.time()
            _wait(tap, lambda: stored_seq() >= _newest_seq(tap) > seq_at_down + DOWN_S, 15,
                  "the registry to catch up with the agent")
            tap.drain(2 * INTERVAL_S)

            newest_before = _newest_seq(tap)
            shown = subprocess.run([str(CHIFFON), "status", "--json"], env=env,
                                   capture_output=True, text=True, timeout=60, check=False)
            record = registry.agent(agent_id, with_snapshot=False)
            tap.drain(0.3)
            newest_after = _newest_seq(tap)
            registry.close()
            assert shown.returncode == 0, shown.stderr
            status = {entry["agent_id"]: entry for entry in json.loads(shown.stdout)}
            assert agent_id in status, shown.stdout
            assert record is not None
            second_exit = second.stop()
            yield ConsumerOutage(agent, agent.log(), list(tap.received), down_at, back_at,
                                 seq_at_down, depths, status[agent_id], newest_before,
                                 newest_after, record, second.log(), (first_exit, second_exit))
        finally:
            for orchestrator in orchestrators:
                orchestrator.stop()
            if agent is not None:
                agent.stop()
            if tap is not None:
                tap.close()


def test_the_agent_keeps_publishing_heartbeats_on_time_while_the_orchestrator_is_down(
        outage: ConsumerOutage) -> None:
    collected = sorted(beat.snapshot["collected_at"] for beat in outage.heartbeats
                       if outage.down_at <= beat.snapshot["collected_at"] <= outage.back_at)
    assert len(collected) >= (outage.back_at - outage.down_at) / INTERVAL_S - 1
    gaps = [later - earlier for earlier, later in itertools.pairwise(collected)]
    assert max(gaps) <= INTERVAL_S + SLACK_S, gaps


def test_the_agent_notices_nothing_of_the_orchestrator_being_down(
        outage: ConsumerOutage) -> None:
    assert outage.agent.alive
    broker_trouble = r"not sent|cannot reach broker|Cannot connect|Connection to broker lost"
    assert not re.search(broker_trouble, outage.agent_log), outage.agent_log


def test_unconsumed_heartbeats_expire_in_the_broker_instead_of_piling_up(
        outage: ConsumerOutage) -> None:
    depths = [depth for _, depth in outage.depths]
    bound = TIMEOUT_S / INTERVAL_S
    assert max(depths) <= bound + 2, depths  # about timeout/interval, however long it is down
    assert max(depths) >= bound - 1, depths  # ... and the queue did back up meanwhile
    settled = [depth for at, depth in outage.depths if at > outage.down_at + TIMEOUT_S + 1]
    assert settled and max(settled) <= bound + 2, settled


def test_the_returning_orchestrator_shows_the_agent_online_with_its_newest_seq(
        outage: ConsumerOutage) -> None:
    status = outage.status
    assert status["state"] == "online"
    assert status["age_seconds"] < TIMEOUT_S
    # the newest heartbeat, or the one a batch commit (<= 0.25 s) behind it
    assert outage.newest_before_status - 1 <= status["seq"] <= outage.newest_after_status
    assert status["seq"] > outage.seq_at_down + DOWN_S / INTERVAL_S
    assert status["boot_id"] == outage.heartbeats[-1].snapshot["boot_id"]


def test_the_heartbeats_that_expired_while_it_was_down_are_counted_as_missed(
        outage: ConsumerOutage) -> None:
    gaps = re.findall(r"agent (\S+): (\d+) heartbeat\(s\) missed \(seq (\d+) -> (\d+)\)",
                      outage.orchestrator_log)
    assert [(agent, int(a)) for agent, _, a, _ in gaps] == [
        (outage.agent.agent_id, outage.seq_at_down)], outage.orchestrator_log
    missed = int(gaps[0][1])
    assert outage.status["missed"] == missed
    # exactly the heartbeats that outlived their timeout in the queue
    published = {beat.snapshot["seq"]: beat.snapshot["collected_at"]
                 for beat in outage.heartbeats if beat.snapshot["seq"] > outage.seq_at_down}
    surely = sum(1 for at in published.values()
                 if at + TIMEOUT_S < outage.back_at - EXPIRY_MARGIN_S)
    maybe = sum(1 for at in published.values()
                if at + TIMEOUT_S < outage.back_at + EXPIRY_MARGIN_S)
    assert surely <= missed <= maybe, (surely, missed, maybe)
    # every seq of this boot was either stored or counted missed
    record = outage.record
    assert record.seq == record.history_count + record.missed


def test_an_orchestrator_restart_is_not_counted_as_an_agent_restart(
        outage: ConsumerOutage) -> None:
    assert outage.status["restarts"] == 0
    assert "restarted" not in outage.orchestrator_log


def test_the_orchestrator_stops_cleanly_and_comes_back_without_errors(
        outage: ConsumerOutage) -> None:
    assert outage.exit_codes == (0, 0)
    assert not re.search(r"Traceback|ERROR", outage.orchestrator_log), outage.orchestrator_log
