"""Drain, undrain and forget end to end: a real agent (``celery -A chiffon_worker worker -B``)
and a real ``chiffon orchestrator`` on a private RabbitMQ vhost, driven through the
``chiffon`` command as an operator would.

A drained agent cancels the consumer of its pool queue (work published there waits) but
keeps the one of its own queue; its heartbeats say ``accepting: false`` (``drained``); it
stays drained across a restart; undrain brings the consumer back and the waiting work
runs. An agent that was away when drained is drained by the enforcer once it is back.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from chiffon_worker.cli import main
from chiffon_worker.orchestrator.agent_control import AgentControl
from chiffon_worker.orchestrator.drain_enforcer import DrainEnforcer
from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.wire import EXECUTE_WORK_TASK, declared_queue
from tests.conftest import missing_service
from tests.integration.helpers import (
    READY_TIMEOUT_S,
    Agent,
    HeartbeatTap,
    close_client,
    delete_agent_queues,
    queue_consumers,
    queue_depth,
    start_agent,
    unique,
    work_client,
)
from tests.orchestrator.feeding import Feeder
from tests.orchestrator_process import (
    CHIFFON,
    OrchestratorOnVhost,
    VhostUnavailable,
    orchestrator_on,
    private_vhost,
)
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Seconds to wait for something the agent or the orchestrator does within a heartbeat.
SOON_S = 20.0


@dataclass
class Lab:
    """A private vhost with an orchestrator on it, and the agents a test starts there.

    Every agent of a test shares one id, one pool and one state directory, so a second
    start is the same agent restarted (its drain mark survives)."""

    url: str
    tmp: Path
    running: OrchestratorOnVhost
    registry: Registry
    agent_id: str = field(default_factory=lambda: unique("t-drain"))
    pool: str = field(default_factory=lambda: unique("t-pool"))
    agents: list[Agent] = field(default_factory=list)
    taps: list[HeartbeatTap] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.tmp / "agent-state"

    def start(self) -> Agent:
        """Start the agent (again) and wait until it is ready."""
        agent = start_agent(self.tmp / f"run-{len(self.agents)}", self.url,
                            agent_id=self.agent_id, pool=self.pool,
                            extra_env={"CHIFFON_STATE_DIR": str(self.state_dir)})
        self.agents.append(agent)
        agent.wait_ready()
        return agent

    def tap(self) -> HeartbeatTap:
        tap = HeartbeatTap(self.url, self.agent_id)
        self.taps.append(tap)
        return tap

    def chiffon(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(CHIFFON), *args], env=self.running.env,
                              capture_output=True, text=True, timeout=60, check=False)

    def record(self) -> Any:
        return self.registry.agent(self.agent_id, with_snapshot=False)

    def wait_known(self, *, accepting: bool | None = None) -> None:
        """Until the registry holds the agent online with events (and ``accepting``)."""
        def known() -> bool:
            record = self.record()
            return record is not None and record.signs is not None \
                and record.liveness(time.time()) == "online" \
                and (accepting is None or record.metrics["accepting"] is accepting)
        wait_until(known, READY_TIMEOUT_S, f"{self.agent_id} online in the registry")

    def consumers(self) -> tuple[int, int]:
        """Consumers of the pool queue and of the agent's own queue."""
        return (queue_consumers(self.url, self.pool),
                queue_consumers(self.url, f"chiffon.agent.{self.agent_id}"))


@pytest.fixture
def lab(rabbitmq_url: str, tmp_path: Path) -> Iterator[Lab]:
    try:
        with private_vhost(rabbitmq_url) as url, orchestrator_on(url, tmp_path) as running, \
                Registry(running.registry_url) as registry:
            lab = Lab(url, tmp_path, running, registry)
            try:
                yield lab
            finally:
                for agent in lab.agents:
                    agent.stop()
                for tap in lab.taps:
                    tap.close()
    except VhostUnavailable as exc:
        missing_service(str(exc))


def drained_heartbeat(tap: HeartbeatTap) -> dict[str, Any] | None:
    beat = tap.wait_until(lambda s: s.get("accepting") is False, SOON_S)
    return None if beat is None else beat.snapshot


def test_drain_by_hostname_stops_the_pool_consumer_and_keeps_the_agent_queue(lab: Lab
                                                                              ) -> None:
    lab.start()
    lab.wait_known()
    assert lab.consumers() == (1, 1)
    tap = lab.tap()
    done = lab.chiffon("drain", socket.gethostname())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"draining {lab.agent_id} ({socket.gethostname()}): it finishes its running work "
        f"and takes no new work from pool {lab.pool}")
    wait_until(lambda: lab.consumers() == (0, 1), SOON_S, "the pool consumer cancelled")
    snapshot = drained_heartbeat(tap)
    assert snapshot is not None, "no heartbeat said accepting: false"
    assert (snapshot["accepting_reason"], snapshot["work_running"]) == ("drained", 0)
    mark = json.loads((lab.state_dir / "drained").read_text())
    assert mark["requested_by"].endswith(f"@{socket.gethostname()}")


def test_work_sent_to_a_drained_pool_waits_and_runs_after_undrain(lab: Lab) -> None:
    lab.start()
    lab.wait_known()
    prefix = lab.agent_id[:-3]
    assert lab.chiffon("drain", prefix).returncode == 0
    wait_until(lambda: lab.consumers() == (0, 1), SOON_S, "the pool consumer cancelled")
    client = work_client(lab.url, "rpc://")
    tap = lab.tap()
    try:
        request = {"work_id": unique("w"), "work_type": "echo", "payload": {}}
        result = client.send_task(EXECUTE_WORK_TASK, args=[request],
                                  queue=declared_queue(lab.pool))
        seen = len(tap.wait_for(2, SOON_S))  # two heartbeats: the agent is alive and idle
        assert seen >= 2
        assert queue_depth(lab.url, lab.pool) == 1
        done = lab.chiffon("undrain", prefix)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == (
            f"undrained {lab.agent_id} ({socket.gethostname()}): it takes new work from "
            f"pool {lab.pool} again")
        wait_until(lambda: lab.consumers() == (1, 1), SOON_S, "the pool consumer back")
        assert result.get(timeout=SOON_S)["status"] == "success"
        assert not (lab.state_dir / "drained").exists()
    finally:
        close_client(client)


def test_a_draining_agent_finishes_its_running_work(lab: Lab) -> None:
    lab.start()
    lab.wait_known()
    client = work_client(lab.url, "rpc://")
    tap = lab.tap()
    try:
        request = {"work_id": unique("w"), "work_type": "sleep", "payload": {"seconds": 3}}
        result = client.send_task(EXECUTE_WORK_TASK, args=[request],
                                  queue=declared_queue(lab.pool))
        assert tap.wait_until(lambda s: s.get("work_running") == 1, SOON_S) is not None
        assert lab.chiffon("drain", lab.agent_id).returncode == 0
        busy = tap.wait_until(lambda s: s.get("accepting") is False, SOON_S)
        assert busy is not None and busy.snapshot["work_running"] == 1  # draining
        assert result.get(timeout=SOON_S)["status"] == "success"
        idle = tap.wait_until(lambda s: s.get("work_running") == 0, SOON_S)
        assert idle is not None and idle.snapshot["accepting"] is False  # drained
        assert queue_depth(lab.url, lab.pool) == 0  # acknowledged, not redelivered
    finally:
        close_client(client)


def test_status_shows_a_drained_agent_as_drained(lab: Lab) -> None:
    lab.start()
    lab.wait_known()
    assert lab.chiffon("drain", lab.agent_id).returncode == 0

    def row() -> str | None:
        table = lab.chiffon("status", "--wide").stdout
        line = next((x for x in table.splitlines() if x.startswith(lab.agent_id)), "")
        return line if " drained " in line else None

    wait_until(row, SOON_S, "chiffon status to show drained")
    shown = json.loads(lab.chiffon("status", "--json").stdout)
    entry = next(e for e in shown if e["agent_id"] == lab.agent_id)
    assert (entry["drain"], entry["accepting"], entry["accepting_reason"]) == (
        "drained", False, "drained")
    assert isinstance(entry["drain_requested_at"], float)


def test_a_drained_agent_restarted_stays_drained(lab: Lab) -> None:
    first = lab.start()
    lab.wait_known()
    assert lab.chiffon("drain", lab.agent_id).returncode == 0
    wait_until(lambda: lab.consumers() == (0, 1), SOON_S, "the pool consumer cancelled")
    first.stop()
    tap = lab.tap()
    again = lab.start()
    assert lab.consumers() == (0, 1)
    assert "agent drained" in again.log()
    beats = tap.wait_for(1, SOON_S)  # the first of the new run says it at once
    assert beats, again.log()
    assert (beats[0].snapshot["accepting"], beats[0].snapshot["accepting_reason"]) == (
        False, "drained")


def test_an_agent_away_when_drained_is_drained_by_the_enforcer_once_back(lab: Lab) -> None:
    first = lab.start()
    lab.wait_known()
    first.stop()
    wait_until(lambda: lab.record().liveness(time.time()) == "stopped", SOON_S,
               "the agent stopped")
    done = lab.chiffon("drain", lab.agent_id)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"drain recorded for {lab.agent_id}; the agent is not answering: it stays out of "
        f"service once it is back")
    lab.start()
    assert lab.consumers() == (1, 1)  # it never heard the drain
    lab.wait_known(accepting=True)
    with AgentControl(lab.url) as control:
        sent = DrainEnforcer(control).enforce(lab.registry.agents(), time.time())
    assert sent == [(lab.agent_id, "drain")]
    wait_until(lambda: lab.consumers() == (0, 1), SOON_S, "the pool consumer cancelled")
    lab.wait_known(accepting=False)


def test_forget_of_a_stopped_agent_needs_no_force(lab: Lab) -> None:
    lab.start().stop()
    wait_until(lambda: (r := lab.record()) is not None and
               r.liveness(time.time()) == "stopped", READY_TIMEOUT_S, "the agent stopped")
    done = lab.chiffon("forget", lab.agent_id)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"forgot {lab.agent_id} ({socket.gethostname()})"
    assert lab.record() is None


def test_forget_refuses_an_online_agent_and_force_removes_it(
        rabbitmq_url: str, tmp_path: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # the registry is fed here, not by an orchestrator: nothing adds the agent back
    state = tmp_path / "registry-state"
    monkeypatch.setenv("CHIFFON_STATE_DIR", str(state))
    agent_id = unique("t-forget")
    tap = HeartbeatTap(rabbitmq_url, agent_id)
    agent = start_agent(tmp_path, rabbitmq_url, agent_id=agent_id)
    try:
        beats = tap.wait_for(1, READY_TIMEOUT_S)
        assert beats, agent.log()
        with Registry(f"sqlite:///{state / 'registry.sqlite3'}") as registry:
            feeder = Feeder(registry)
            feeder.snapshot(beats[0].snapshot, received_at=time.time())
            feeder.commit()
            assert main(["forget", agent_id[:-2]]) == 1
            assert capsys.readouterr().err.strip() == (
                f"chiffon: error: agent {agent_id} ({socket.gethostname()}) is online: stop "
                f"it first, or use --force")
            assert registry.agent(agent_id) is not None
            assert main(["forget", agent_id, "--force"]) == 0
            assert capsys.readouterr().out.startswith(f"forgot {agent_id} (")
            assert registry.agent(agent_id) is None
    finally:
        agent.stop()
        tap.delete()
        delete_agent_queues(rabbitmq_url, agent.pool, agent.agent_queue)
