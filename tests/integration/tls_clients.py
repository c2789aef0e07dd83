"""What the TLS broker specs share (tests/integration/test_broker_tls.py on RabbitMQ,
test_broker_tls_redis.py on Redis): a correct client's environment, an orchestrator and
an agent running over TLS, and running ``chiffon`` commands against them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.helpers import Agent, agent_environment, start_agent, unique
from tests.orchestrator_process import FOLLOWING_EVENTS, Orchestrator, start_orchestrator
from tests.throwaway_ca import Pki
from tests.waiting import wait_until

CHIFFON = [sys.executable, "-m", "chiffon_worker.cli"]
#: How long the orchestrator or the agent may take to be ready (seconds).
START_TIMEOUT_S = 30.0
#: How long a process that must stop by itself may take (seconds).
EXIT_TIMEOUT_S = 60.0


def tls_env(url: str, pki: Pki, root: Path, home: Path, **changes: str) -> dict[str, str]:
    """A clean environment for chiffon on the TLS broker ``url`` (right CA, client
    certificate, state under ``root``), with ``changes`` (``CHIFFON_*`` names; an empty
    value removes the variable)."""
    settings = {
        "CHIFFON_BROKER_URL": url,
        "CHIFFON_BROKER_TLS_CA_FILE": str(pki.cert("ca")),
        "CHIFFON_BROKER_TLS_CERT_FILE": str(pki.cert("client")),
        "CHIFFON_BROKER_TLS_KEY_FILE": str(pki.key("client")),
        "CHIFFON_STATE_DIR": str(root / "state"),
        "CHIFFON_LOG_LEVEL": "WARNING",
        **changes,
    }
    home.mkdir(parents=True, exist_ok=True)
    return agent_environment(home, {key: value for key, value in settings.items() if value})


@dataclass
class Fleet:
    """An orchestrator and an agent, both over TLS."""

    orchestrator: Orchestrator
    agent: Agent
    env: dict[str, str]  # chiffon's environment (same registry)


@contextmanager
def running_fleet(env: dict[str, str], url: str, root: Path) -> Iterator[Fleet]:
    """``chiffon orchestrator`` with ``env`` (following worker events), then an agent on
    ``url`` with the same TLS settings; both stopped at the end."""
    orchestrator = start_orchestrator(env, root / "orchestrator.log")
    agent: Agent | None = None
    try:
        wait_until(lambda: FOLLOWING_EVENTS in orchestrator.log()
                   or orchestrator.popen.poll() is not None, START_TIMEOUT_S,
                   lambda: f"the orchestrator to follow worker events:\n{orchestrator.log()}")
        assert orchestrator.popen.poll() is None, orchestrator.log()
        agent_env = {name: value for name, value in env.items()
                     if name.startswith("CHIFFON_BROKER_TLS_")}
        agent = start_agent(root, url, extra_env=agent_env)
        agent.wait_ready()
        yield Fleet(orchestrator, agent, env)
    finally:
        if agent is not None:
            agent.stop()
        orchestrator.stop()


def chiffon(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CHIFFON, *argv], env=env, capture_output=True, text=True,
                          timeout=EXIT_TIMEOUT_S, check=False)


def the_one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The message of a run that printed exactly one ``chiffon: error:`` line and nothing
    else."""
    assert done.stdout == "", done.stdout
    stderr = done.stderr
    assert stderr.count("\n") == 1 and stderr.startswith("chiffon: error: "), stderr
    return stderr[len("chiffon: error: "):].rstrip("\n")


def submit(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``chiffon submit`` of one piece of work to a pool nobody serves (no registry needed)."""
    return chiffon(env, "submit", "echo", "{}", "--pool", unique("t-pool"), "--queue-anyway")


def status_of(env: dict[str, str], agent_id: str) -> dict[str, Any] | None:
    done = chiffon(env, "status", "--json")
    assert done.returncode == 0, done.stderr
    return next((row for row in json.loads(done.stdout) if row["agent_id"] == agent_id), None)
