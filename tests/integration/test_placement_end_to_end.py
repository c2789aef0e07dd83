"""Placement end to end: a real ``chiffon orchestrator`` and a real agent on a private vhost.
A ``chiffon submit --needs`` reserves on the agent it chose; the agent's task events mark
the work running, then ended, which releases what it held; ``chiffon work`` shows it."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.orchestrator.reservations import Reservation
from tests.conftest import missing_service
from tests.integration.helpers import READY_TIMEOUT_S, Agent, running_agent
from tests.orchestrator_process import (
    CHIFFON,
    OrchestratorOnVhost,
    VhostUnavailable,
    orchestrator_on,
    private_vhost,
)
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SLEEP_S = 2.0


@pytest.fixture(scope="module")
def fleet(rabbitmq_url: str, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[OrchestratorOnVhost, Agent, Registry]]:
    tmp = tmp_path_factory.mktemp("placement")
    try:
        with private_vhost(rabbitmq_url) as url, orchestrator_on(url, tmp) as running, \
                running_agent(tmp, url) as agent, Registry(running.registry_url) as registry:
            wait_until(lambda: _online_with_events(registry, agent), READY_TIMEOUT_S,
                 "the agent online with worker events")
            yield running, agent, registry
    except VhostUnavailable as exc:
        missing_service(str(exc))


def _online_with_events(registry: Registry, agent: Agent) -> bool:
    record = registry.agent(agent.agent_id, with_snapshot=False)
    return record is not None and record.signs is not None and \
        record.liveness(time.time()) == "online"


def chiffon(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CHIFFON), *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def the_work(registry: Registry, work_id: str, *, ended: bool = False) -> Reservation | None:
    listed = registry.work(ended_since=0.0 if ended else None)
    return next((w for w in listed if w.work_id == work_id), None)


def test_placed_work_is_held_while_it_runs_and_released_when_it_ends(
        fleet: tuple[OrchestratorOnVhost, Agent, Registry]) -> None:
    running, agent, registry = fleet
    done = chiffon(running.env, "submit", "sleep", json.dumps({"seconds": SLEEP_S}),
                   "--pool", agent.pool, "--needs", "cores=1", "--work-id", "e2e-sleep")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["agent_id"] == agent.agent_id
    placed = the_work(registry, "e2e-sleep")
    assert placed is not None and placed.needs == {"cores": 1.0}
    started = wait_until(lambda: (w := the_work(registry, "e2e-sleep")) and w.state == "running"
                   and w, 20, "the task-started event")
    listed = chiffon(running.env, "work")
    assert "e2e-sleep" in listed.stdout and "running" in listed.stdout, listed
    assert "1 cores" in listed.stdout
    ended = wait_until(lambda: the_work(registry, "e2e-sleep") is None and
                 the_work(registry, "e2e-sleep", ended=True), SLEEP_S + 20,
                 "the task-succeeded event")
    assert ended.state == "succeeded"
    assert ended.ended_at is not None and started.started_at is not None
    assert ended.ended_at - started.started_at >= SLEEP_S - 0.5


def test_work_sent_to_the_pool_is_listed_from_the_agents_task_events(
        fleet: tuple[OrchestratorOnVhost, Agent, Registry]) -> None:
    running, agent, registry = fleet
    done = chiffon(running.env, "submit", "sleep", json.dumps({"seconds": SLEEP_S}),
                   "--pool", agent.pool, "--work-id", "e2e-pool")
    assert done.returncode == 0, done.stderr
    seen = wait_until(lambda: the_work(registry, "e2e-pool"), 20, "the pool work in the registry")
    assert (seen.agent_id, seen.needs) == (agent.agent_id, {})
    json_listing = json.loads(chiffon(running.env, "work", "--json").stdout)
    assert any(w["work_id"] == "e2e-pool" and w["holds"] == {} for w in json_listing)
