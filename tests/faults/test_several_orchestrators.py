"""Several orchestrators: real ``chiffon orchestrator`` processes and real agents on a
private vhost of the machine's RabbitMQ.

- On one PostgreSQL registry, three orchestrators consume the heartbeat queue together
  (RabbitMQ hands each of them every third heartbeat or so, so an agent's heartbeats reach
  the registry through all three, in any order); one leads (follows worker events). Kill
  the leader (SIGKILL, mid-batch): the others carry on and one takes the lead. Every
  agent's ``seq``, ``restarts``, ``missed`` and history come out exactly as the
  heartbeats the agents sent (seen through a tap of their own).
- A second registry filled with ``--copy`` gets every heartbeat too, taking none.
- On SQLite a second orchestrator on the same file refuses to start, naming the file.
"""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from chiffon_worker.orchestrator.registry import Registry
from tests.conftest import missing_service
from tests.integration.helpers import (
    Agent,
    HeartbeatTap,
    agent_environment,
    delete_agent_queues,
    start_agent,
)
from tests.orchestrator_process import (
    CHIFFON,
    Orchestrator,
    rabbitmqctl,
    start_orchestrator,
)
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
INTERVAL_S = 0.5
AGENTS = 3


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A database of its own on the machine's PostgreSQL; dropped afterwards."""
    name = f"chiffon_ha_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        missing_service(f"PostgreSQL: {exc}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')



def orchestrator(tmp: Path, name: str, broker: str, database: str, *args: str
                 ) -> Orchestrator:
    env = agent_environment(tmp / f"{name}-home", {
        "CHIFFON_BROKER_URL": broker, "CHIFFON_DATABASE_URL": database,
        "CHIFFON_STATE_DIR": str(tmp / f"{name}-state"), "CHIFFON_LOG_LEVEL": "INFO"})
    if not args:
        return start_orchestrator(env, tmp / f"{name}.log")
    with (tmp / f"{name}.log").open("wb") as log:
        popen = subprocess.Popen([str(CHIFFON), "orchestrator", "--metrics-port", "0", *args],
                                 env=env, stdout=log, stderr=subprocess.STDOUT)
    return Orchestrator(popen, tmp / f"{name}.log")


def consuming(orch: Orchestrator) -> bool:
    return "consuming chiffon.heartbeats on" in orch.log()


def consumers(vhost_url: str, queue: str) -> int:
    """How many consumers ``queue`` has on the vhost of ``vhost_url``."""
    listed = rabbitmqctl("list_queues", "-p", urlsplit(vhost_url).path.lstrip("/"), "name",
                         "consumers", "--quiet", "--formatter", "json")
    return next((int(q["consumers"]) for q in json.loads(listed.stdout or "[]")
                 if q["name"] == queue), 0)


def test_orchestrators_share_the_queue_and_the_books_match_what_agents_sent_after_a_kill(
        tmp_path: Path, vhost: str, pg_database: str) -> None:
    first = orchestrator(tmp_path, "first", vhost, pg_database)
    wait_until(lambda: consuming(first) and "following worker events" in first.log(), 30,
               "the first orchestrator to consume and lead")
    others = [orchestrator(tmp_path, name, vhost, pg_database) for name in ("second", "third")]
    copy = orchestrator(tmp_path, "copy", vhost,
                        f"sqlite:///{tmp_path / 'copy.sqlite3'}", "--copy")
    agents: list[Agent] = []
    taps: dict[str, HeartbeatTap] = {}
    try:
        wait_until(lambda: all(consuming(o) and "standby" in o.log() for o in others), 30,
                   "the others to consume, standing by for the lead")
        wait_until(lambda: consumers(vhost, "chiffon.heartbeats") == 3, 30,
                   "three consumers on the heartbeat queue")
        wait_until(lambda: "consuming chiffon.heartbeats.copy." in copy.log(), 30,
             "the copy to consume its own queue")
        for _ in range(AGENTS):
            agent = start_agent(tmp_path, vhost, interval=INTERVAL_S)
            taps[agent.agent_id] = HeartbeatTap(vhost, agent.agent_id)
            agents.append(agent)
        for tap in taps.values():
            tap.wait_for(6, 60)
        first.popen.send_signal(signal.SIGKILL)  # mid-flow: unacked heartbeats go back
        first.popen.wait(10)
        wait_until(lambda: any("took the lead" in o.log() for o in others), 30,
                   "another orchestrator to take the lead")
        assert consumers(vhost, "chiffon.heartbeats") == 2
        for tap in taps.values():
            tap.wait_for(len(tap.received) + 6, 60)
        for agent in agents:
            agent.stop()
        sent = {agent_id: max(b.snapshot["seq"] for b in tap.received)
                for agent_id, tap in taps.items()}
        for agent_id, tap in taps.items():
            tap.drain(1.0)
            sent[agent_id] = max(b.snapshot["seq"] for b in tap.received)
        with Registry(pg_database) as shared, \
                Registry(f"sqlite:///{tmp_path / 'copy.sqlite3'}") as copied:
            for registry in (shared, copied):
                wait_until(lambda r=registry: all(  # type: ignore[misc]
                    (rec := r.agent(a, with_snapshot=False)) is not None
                    and rec.seq == seq for a, seq in sent.items()), 30,
                    "every last heartbeat in the registry")
                for agent_id, seq in sent.items():
                    record = registry.agent(agent_id, with_snapshot=False)
                    assert record is not None
                    assert (record.restarts, record.missed) == (0, 0), agent_id
                    assert record.history_count == seq, "each heartbeat recorded once"
                    assert len(registry.history(agent_id)) == seq, "a complete history"
    finally:
        for tap in taps.values():
            tap.delete()
        for agent in agents:
            agent.stop()
            delete_agent_queues(vhost, agent.pool, agent.agent_queue)
        for orch in (first, *others, copy):
            orch.stop()


def test_a_second_orchestrator_on_one_sqlite_registry_refuses_naming_the_file(
        tmp_path: Path, vhost: str) -> None:
    database = f"sqlite:///{tmp_path / 'one.sqlite3'}"
    first = orchestrator(tmp_path, "first", vhost, database)
    try:
        wait_until(lambda: consuming(first), 30, "the first orchestrator to consume")
        second = orchestrator(tmp_path, "second", vhost, database)
        assert second.popen.wait(30) == 1
        lines = second.log().strip().splitlines()
        assert lines[-1].startswith("chiffon: error: registry ")
        assert str(tmp_path / "one.sqlite3") in lines[-1]
        assert "in use by another chiffon orchestrator" in lines[-1]
        assert "Traceback" not in second.log()
    finally:
        first.stop()
