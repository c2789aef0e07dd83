"""Liveness in seconds: a real ``chiffon orchestrator`` and real agents, at default settings
(a capacity heartbeat every 30 s, 90 s timeout), on a private vhost of the machine's
RabbitMQ. A clean stop shows ``stopped`` within 1 s of the process exiting; a kill or a
freeze shows ``lost`` within 10 s; a thawed agent is ``online`` again; ``chiffon status``
says the same as the registry."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.wire import HEARTBEAT_QUEUE
from tests.conftest import missing_service
from tests.integration.helpers import (
    CELERY,
    READY_TIMEOUT_S,
    Agent,
    agent_environment,
    delete_agent_queues,
    start_agent,
)
from tests.orchestrator.conftest import Publisher
from tests.orchestrator.snapshots import make_snapshot
from tests.orchestrator_process import CHIFFON, VhostUnavailable, orchestrator_on, private_vhost

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEFAULT_INTERVAL_S = 30.0
DEFAULT_TIMEOUT_S = 90.0
STOPPED_WITHIN_S = 1.0
LOST_WITHIN_S = 10.0


@dataclass
class Fleet:
    """A private vhost with one orchestrator; agents are started per test."""

    url: str
    env: dict[str, str]
    registry: Registry
    tmp: Path

    def start(self) -> Agent:
        agent = start_agent(self.tmp, self.url, interval=DEFAULT_INTERVAL_S, extra_env={
            "CHIFFON_HEARTBEAT_TIMEOUT_SECONDS": f"{DEFAULT_TIMEOUT_S:g}"})
        agent.wait_ready()
        self.wait_for(agent, lambda liveness, record: liveness == "online"
                      and record.signs is not None, READY_TIMEOUT_S, "online with events")
        return agent

    def liveness(self, agent: Agent) -> tuple[str | None, object]:
        record = self.registry.agent(agent.agent_id, with_snapshot=False)
        return (None if record is None else record.liveness(time.time())), record

    def wait_for(self, agent: Agent, condition: Callable[[str | None, object], bool],
                 timeout: float, what: str) -> float:
        """Poll the registry until ``condition(liveness, record)``; returns when (time.time())."""
        deadline = time.monotonic() + timeout
        while True:
            liveness, record = self.liveness(agent)
            if liveness is not None and condition(liveness, record):
                return time.time()
            if time.monotonic() > deadline:
                raise AssertionError(f"{agent.agent_id} not {what} after {timeout:g} s "
                                     f"(liveness {liveness})")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def fleet(rabbitmq_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("liveness")
    try:
        with private_vhost(rabbitmq_url) as url, orchestrator_on(url, tmp) as running, \
                Registry(running.registry_url) as registry:
            yield Fleet(url, running.env, registry, tmp)
    except VhostUnavailable as exc:
        missing_service(str(exc))


def test_a_clean_stop_shows_stopped_within_a_second_of_the_exit(fleet: Fleet) -> None:
    agent = fleet.start()
    agent.popen.send_signal(signal.SIGTERM)
    agent.popen.wait(30)
    exited = time.time()
    shown = fleet.wait_for(agent, lambda liveness, _: liveness == "stopped",
                           STOPPED_WITHIN_S + 5, "stopped")
    assert shown - exited <= STOPPED_WITHIN_S, f"stopped after {shown - exited:.2f} s"


def test_a_killed_agent_is_lost_within_ten_seconds(fleet: Fleet) -> None:
    agent = fleet.start()
    agent.kill()
    killed = time.time()
    shown = fleet.wait_for(agent, lambda liveness, _: liveness == "lost", LOST_WITHIN_S + 10,
                           "lost")
    assert shown - killed <= LOST_WITHIN_S, f"lost after {shown - killed:.2f} s"


def test_a_frozen_agent_is_lost_within_ten_seconds_and_online_again_when_it_thaws(
        fleet: Fleet) -> None:
    agent = fleet.start()
    try:
        agent.popen.send_signal(signal.SIGSTOP)
        frozen = time.time()
        shown = fleet.wait_for(agent, lambda liveness, _: liveness == "lost",
                               LOST_WITHIN_S + 10, "lost")
        assert shown - frozen <= LOST_WITHIN_S, f"lost after {shown - frozen:.2f} s"
        agent.popen.send_signal(signal.SIGCONT)
        fleet.wait_for(agent, lambda liveness, _: liveness == "online", 15, "online again")
    finally:
        agent.popen.send_signal(signal.SIGCONT)
        agent.stop()


def test_chiffon_status_shows_the_same_liveness_as_the_registry(fleet: Fleet) -> None:
    agent = fleet.start()
    agent.kill()
    fleet.wait_for(agent, lambda liveness, _: liveness == "lost", LOST_WITHIN_S + 10, "lost")
    shown = subprocess.run([str(CHIFFON), "status", "--json"], env=fleet.env,
                           capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    entry = {e["agent_id"]: e for e in json.loads(shown.stdout)}[agent.agent_id]
    assert (entry["liveness"], entry["state"]) == ("lost", "offline")
    table = subprocess.run([str(CHIFFON), "status", "--wide"], env=fleet.env,
                           capture_output=True, text=True, timeout=60, check=False)
    row = next(line for line in table.stdout.splitlines() if line.startswith(agent.agent_id))
    assert " lost " in row


def test_a_forged_heartbeat_for_a_live_agents_id_shows_as_a_conflict_not_a_takeover(
        fleet: Fleet) -> None:
    agent = start_agent(fleet.tmp, fleet.url, interval=1.0)  # fast capacity heartbeats
    try:
        agent.wait_ready()
        fleet.wait_for(agent, lambda liveness, _: liveness == "online", READY_TIMEOUT_S,
                       "online")
        publisher = Publisher(fleet.url, HEARTBEAT_QUEUE)
        try:
            publisher.heartbeat(make_snapshot(agent.agent_id, pool=agent.pool, seq=1,
                                              boot_id="forged-boot", started_at=time.time(),
                                              hostname="intruder", interval=1.0, timeout=5.0))
        finally:
            publisher.connection.release()
        fleet.wait_for(agent, lambda liveness, record: liveness == "conflict"
                       and record.conflict.hostname == socket.gethostname(), 15,
                       "in conflict naming the real host")
        # the forger sends nothing more: the real agent takes its id back
        fleet.wait_for(agent, lambda liveness, record: liveness == "online"
                       and record.hostname != "intruder", 20, "online again as itself")
    finally:
        agent.stop()


def _start_on_another_host(fleet: Fleet, agent_id: str, pool: str, hostname: str
                           ) -> subprocess.Popen[bytes]:
    """``celery -A chiffon_worker worker -B`` in its own UTS namespace, named ``hostname``:
    a cloned machine with the same machine id (so the same agent id), another hostname."""
    if shutil.which("unshare") is None:
        missing_service("unshare not on PATH (needed to give an agent another hostname)")
    home = fleet.tmp / f"home-{hostname}-{agent_id}"
    home.mkdir(parents=True)
    env = agent_environment(home, {
        "CHIFFON_BROKER_URL": fleet.url, "CHIFFON_AGENT_ID": agent_id,
        "CHIFFON_AGENT_POOL_NAME": pool, "CHIFFON_HEARTBEAT_INTERVAL": "1",
        "CHIFFON_HEARTBEAT_TIMEOUT_SECONDS": "5"})
    log = (fleet.tmp / f"{hostname}-{agent_id}.log").open("wb")
    script = f'hostname {hostname} && exec "$0" -A chiffon_worker worker -B'
    with log:
        return subprocess.Popen(["unshare", "--uts", "sh", "-c", script, str(CELERY)],
                                env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT)


def test_two_live_agents_sharing_an_id_on_two_hosts_show_as_a_conflict_until_one_stops(
        fleet: Fleet) -> None:
    agent = start_agent(fleet.tmp, fleet.url, interval=1.0)
    clone: subprocess.Popen[bytes] | None = None
    try:
        agent.wait_ready()
        fleet.wait_for(agent, lambda liveness, _: liveness == "online", READY_TIMEOUT_S,
                       "online")
        clone = _start_on_another_host(fleet, agent.agent_id, agent.pool, "clone-b")
        fleet.wait_for(agent, lambda liveness, record: liveness == "conflict"
                       and record.conflict is not None
                       and {record.hostname, record.conflict.hostname}
                       == {socket.gethostname(), "clone-b"}, 20,
                       "in conflict naming both hosts")
        clone.send_signal(signal.SIGTERM)
        clone.wait(30)
        fleet.wait_for(agent, lambda liveness, record: liveness == "online"
                       and record.hostname == socket.gethostname(), 20,
                       "online again as the survivor")
    finally:
        if clone is not None and clone.poll() is None:
            clone.kill()
            clone.wait(30)
        agent.stop()


def test_on_a_redis_broker_a_killed_agent_is_lost_within_ten_seconds_too(
        redis_url: str, tmp_path: Path) -> None:
    with orchestrator_on(redis_url, tmp_path) as running, \
            Registry(running.registry_url) as registry:
        fleet = Fleet(redis_url, running.env, registry, tmp_path)
        agent = fleet.start()  # online, with worker events seen
        try:
            agent.kill()
            killed = time.time()
            shown = fleet.wait_for(agent, lambda liveness, _: liveness == "lost",
                                   LOST_WITHIN_S + 10, "lost")
            assert shown - killed <= LOST_WITHIN_S, f"lost after {shown - killed:.2f} s"
        finally:
            delete_agent_queues(redis_url, agent.pool, agent.agent_queue)
