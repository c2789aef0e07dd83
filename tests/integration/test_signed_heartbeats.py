"""Per-agent heartbeat keys end to end: a real agent and a real ``chiffon orchestrator``.

The orchestrator holds only the lab secret (``heartbeat_lab_secret``, so signatures are
required); the agent holds only its own key (``heartbeat_key``, what ``chiffon
signing-key`` prints: ``derive_agent_key``). Its heartbeats are stored. Then someone
holding *another* agent's key publishes a heartbeat claiming this agent's id (a bigger
``seq``, another hostname: a takeover of its registry row): it is rejected as ``forged``,
counted on ``/metrics``, and the agent's row stays its own. One agent on a private vhost,
heartbeat every second.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kombu import Connection
from prometheus_client.parser import text_string_to_metric_families

from chiffon_worker.orchestrator.registry import AgentRecord, Registry
from chiffon_worker.signing import derive_agent_key, new_lab_secret, sign_snapshot
from chiffon_worker.wire import HEARTBEAT_QUEUE
from tests.conftest import missing_service
from tests.integration.helpers import (
    READY_TIMEOUT_S,
    Agent,
    agent_environment,
    delete_agent_queues,
    start_agent,
    unique,
)
from tests.integration.private_rabbit import free_port
from tests.orchestrator_process import (
    CHIFFON,
    FOLLOWING_EVENTS,
    Orchestrator,
    VhostUnavailable,
    private_vhost,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

LAB_SECRET = new_lab_secret()
#: The agent whose key signs the forged heartbeat (it never runs).
OTHER_AGENT = "t-other-desk"


@dataclass
class SignedLab:
    url: str
    agent: Agent
    orchestrator: Orchestrator
    registry_url: str
    metrics_port: int

    def record(self) -> AgentRecord | None:
        with Registry(self.registry_url, read_only=True) as registry:
            return registry.agent(self.agent.agent_id)

    def rejected(self, reason: str) -> float:
        """``chiffon_heartbeats_rejected_total{reason=...}`` on /metrics (0 when absent)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return sum(sample.value for family in text_string_to_metric_families(text)
                   for sample in family.samples
                   if sample.name == "chiffon_heartbeats_rejected_total"
                   and sample.labels.get("reason") == reason)

    def diagnostics(self) -> str:
        return (f"--- orchestrator\n{self.orchestrator.log()}\n"
                f"--- agent\n{self.agent.log()}")


@pytest.fixture(scope="module")
def signed_lab(rabbitmq_url: str, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[SignedLab]:
    tmp: Path = tmp_path_factory.mktemp("signed")
    try:
        with private_vhost(rabbitmq_url) as url:
            yield from _lab(url, tmp)
    except VhostUnavailable as exc:
        missing_service(str(exc))


def _lab(url: str, tmp: Path) -> Iterator[SignedLab]:
    state, port = tmp / "orchestrator-state", free_port()
    env = agent_environment(tmp / "orchestrator-home", {
        "CHIFFON_BROKER_URL": url, "CHIFFON_STATE_DIR": str(state),
        "CHIFFON_LOG_LEVEL": "INFO", "CHIFFON_HEARTBEAT_LAB_SECRET": LAB_SECRET})
    log_path = tmp / "orchestrator.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen([str(CHIFFON), "orchestrator", "--metrics-port", str(port),
                                  "--metrics-addr", "127.0.0.1"],
                                 env=env, stdout=log, stderr=subprocess.STDOUT)
    orchestrator = Orchestrator(popen, log_path)
    agent: Agent | None = None
    try:
        wait_until(lambda: FOLLOWING_EVENTS in orchestrator.log()
                   or popen.poll() is not None, READY_TIMEOUT_S, "the orchestrator to start")
        assert popen.poll() is None, orchestrator.log()
        agent_id = unique("t-agent")
        agent = start_agent(tmp, url, agent_id=agent_id, extra_env={
            "CHIFFON_HEARTBEAT_KEY": derive_agent_key(LAB_SECRET, agent_id)})
        yield SignedLab(url, agent, orchestrator, f"sqlite:///{state / 'registry.sqlite3'}",
                        port)
    finally:
        if agent is not None:
            agent.stop()
            delete_agent_queues(url, agent.pool, agent.agent_queue)
        orchestrator.stop()


def stored(lab: SignedLab, seq_above: int = 1) -> AgentRecord:
    """The agent's row once it holds a heartbeat with a ``seq`` above ``seq_above``."""

    def newer() -> AgentRecord | None:
        record = lab.record()
        return record if record is not None and record.seq > seq_above else None

    return wait_until(newer, 20, lambda: f"a stored heartbeat above seq {seq_above}\n"
                                         f"{lab.diagnostics()}")


def test_an_agents_heartbeats_signed_with_its_own_key_are_stored(signed_lab: SignedLab
                                                                  ) -> None:
    record = stored(signed_lab)
    assert record.hostname != "intruder"
    assert "signature" in record.snapshot, "stored as received: verifiable later"
    assert signed_lab.rejected("unsigned") == signed_lab.rejected("forged") == 0
    assert "signed heartbeats required (agent keys)" in signed_lab.orchestrator.log()


def test_a_heartbeat_for_its_id_signed_with_another_agents_key_is_rejected_and_counted(
        signed_lab: SignedLab) -> None:
    genuine = stored(signed_lab)
    takeover = {**genuine.snapshot, "hostname": "intruder", "seq": genuine.seq + 1000,
                "collected_at": time.time()}
    forged = sign_snapshot(takeover, derive_agent_key(LAB_SECRET, OTHER_AGENT))
    with Connection(signed_lab.url) as conn:  # a bare JSON snapshot: no Celery needed
        conn.Producer().publish(json.dumps(forged), exchange=HEARTBEAT_QUEUE,
                                routing_key=HEARTBEAT_QUEUE, serializer=None,
                                content_type="application/json", content_encoding="utf-8")
    wait_until(lambda: signed_lab.rejected("forged") == 1, 20,
               lambda: f"the forged heartbeat counted\n{signed_lab.diagnostics()}")
    after = stored(signed_lab, seq_above=genuine.seq)  # the agent's own keep coming
    assert (after.hostname, after.boot_id) == (genuine.hostname, genuine.boot_id)
    assert after.seq < genuine.seq + 1000
    assert f"heartbeat from '{signed_lab.agent.agent_id}' rejected (forged)" in \
        signed_lab.orchestrator.log()
