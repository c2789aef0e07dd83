"""TLS to a Redis broker, end to end: ``rediss://`` to a private ``redis-server`` with TLS only
(``--port 0 --tls-port``), that requires a client certificate (``--tls-auth-clients yes``),
with a throwaway CA (tests/throwaway_ca.py). The machine's Redis on 6379 is never touched.

An agent and an orchestrator over ``rediss://`` run for the module: the agent's heartbeats
and worker events reach the orchestrator's registry, and ``chiffon submit --wait`` gets its
result through the ``rediss://`` result backend. A wrong CA, a host the broker's
certificate does not hold, or no client certificate stops each program with one line and
exit status 2, no traceback, as on RabbitMQ (tests/integration/test_broker_tls.py).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing_service
from tests.integration.helpers import CELERY, Agent, agent_environment, start_agent, unique
from tests.integration.private_rabbit import free_port, port_open
from tests.orchestrator_process import FOLLOWING_EVENTS, Orchestrator, start_orchestrator
from tests.throwaway_ca import Pki, make_pki
from tests.throwaway_ca import available as ca_available
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHIFFON = [sys.executable, "-m", "chiffon_worker.cli"]
#: How long redis-server, the orchestrator or the agent may take to be ready (seconds).
START_TIMEOUT_S = 30.0
#: How long a process that must stop by itself may take (seconds).
EXIT_TIMEOUT_S = 60.0
#: A second loopback address the server also listens on: its certificate holds only
#: ``localhost`` and ``127.0.0.1`` (Linux routes all of 127.0.0.0/8 to the loopback).
OTHER_HOST = "127.0.0.2"


@dataclass
class TlsRedis:
    """The private redis-server, its CA, and the environment of a correct client."""

    pki: Pki
    port: int
    root: Path

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def env(self, home: Path, **changes: str) -> dict[str, str]:
        """A clean environment for chiffon over ``rediss://`` (right CA, client certificate),
        with ``changes`` (``CHIFFON_*`` names; an empty value removes the variable)."""
        settings = {
            "CHIFFON_BROKER_URL": self.url,
            "CHIFFON_BROKER_TLS_CA_FILE": str(self.pki.cert("ca")),
            "CHIFFON_BROKER_TLS_CERT_FILE": str(self.pki.cert("client")),
            "CHIFFON_BROKER_TLS_KEY_FILE": str(self.pki.key("client")),
            "CHIFFON_STATE_DIR": str(self.root / "state"),
            "CHIFFON_LOG_LEVEL": "WARNING",
            **changes,
        }
        home.mkdir(parents=True, exist_ok=True)
        return agent_environment(home, {key: value for key, value in settings.items()
                                        if value})


def _redis_server() -> str:
    """The path of redis-server, or skip (locally) / fail (CI) without it or openssl."""
    server = shutil.which("redis-server")
    if server is None:
        missing_service("redis-server not on PATH (needed for a private Redis with TLS)")
    why_not = ca_available()
    if why_not:
        missing_service(f"a throwaway CA: {why_not}")
    return server


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """redis-server on a free port with TLS only, requiring a client certificate signed by
    the throwaway CA; no persistence; stopped with SIGTERM at the end of the module."""
    server = _redis_server()
    root = tmp_path_factory.mktemp("broker-tls-redis")
    pki = make_pki(root / "pki")
    port = free_port()
    data = root / "redis"
    data.mkdir()
    log_path = root / "redis.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            [server, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", OTHER_HOST,
             "--tls-cert-file", str(pki.cert("server")), "--tls-key-file", str(pki.key("server")),
             "--tls-ca-cert-file", str(pki.cert("ca")), "--tls-auth-clients", "yes",
             "--save", "", "--appendonly", "no", "--dir", str(data), "--daemonize", "no",
             "--loglevel", "warning"],
            stdout=log, stderr=subprocess.STDOUT)

    def listening() -> bool:
        if popen.poll() is not None:
            text = log_path.read_text(errors="replace")
            if "Bad directive" in text and "tls" in text:
                missing_service(f"redis-server is built without TLS:\n{text}")
            raise AssertionError(f"redis-server exited {popen.returncode}:\n{text}")
        return port_open(port)

    try:
        wait_until(listening, START_TIMEOUT_S, f"redis-server on TLS port {port}")
        yield TlsRedis(pki, port, root)
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(15)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(15)


@dataclass
class Fleet:
    """An orchestrator and an agent, both over ``rediss://``."""

    orchestrator: Orchestrator
    agent: Agent
    env: dict[str, str]  # chiffon's environment (same registry)


@pytest.fixture(scope="module")
def fleet(tls_redis: TlsRedis) -> Iterator[Fleet]:
    env = tls_redis.env(tls_redis.root / "home-cli", CHIFFON_LOG_LEVEL="INFO")
    orchestrator = start_orchestrator(env, tls_redis.root / "orchestrator.log")
    agent: Agent | None = None
    try:
        wait_until(lambda: FOLLOWING_EVENTS in orchestrator.log()
                   or orchestrator.popen.poll() is not None, START_TIMEOUT_S,
                   lambda: f"the orchestrator to follow worker events:\n{orchestrator.log()}")
        assert orchestrator.popen.poll() is None, orchestrator.log()
        agent_env = {name: value for name, value in env.items()
                     if name.startswith("CHIFFON_BROKER_TLS_")}
        agent = start_agent(tls_redis.root, tls_redis.url, extra_env=agent_env)
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


# -- over rediss://, everything works ---------------------------------------------------------


def test_an_agent_over_rediss_sends_heartbeats_an_orchestrator_over_rediss_stores(
        fleet: Fleet) -> None:
    row = wait_until(lambda: (found := status_of(fleet.env, fleet.agent.agent_id))
                     and found["last_event_at"] and found,
                     START_TIMEOUT_S, lambda: f"a heartbeat and a worker event in the "
                                              f"registry:\n{fleet.orchestrator.log()}")
    assert row["state"] == "online"
    assert row["liveness"] == "online"  # worker events came over rediss:// too


def test_submit_over_rediss_gets_the_result_through_the_rediss_result_backend(
        fleet: Fleet) -> None:
    done = chiffon(fleet.env, "submit", "sleep", '{"seconds": 0}', "--pool", fleet.agent.pool,
                   "--wait", "--timeout", "30")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["status"], result["agent_id"]) == ("success", fleet.agent.agent_id)


# -- what retrying cannot fix: one line, exit 2 -----------------------------------------------


def test_an_agent_with_the_wrong_ca_on_rediss_stops_with_one_error_line_and_exit_2(
        tls_redis: TlsRedis, tmp_path: Path) -> None:
    other = tls_redis.pki.cert("other-ca")
    env = tls_redis.env(tmp_path / "home", CHIFFON_BROKER_TLS_CA_FILE=str(other),
                        CHIFFON_AGENT_ID=unique("t-agent"), CHIFFON_LOG_LEVEL="")
    done = subprocess.run([str(CELERY), "-A", "chiffon_worker", "worker", "-B"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=EXIT_TIMEOUT_S,
                          check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output and "CRITICAL" not in output
    errors = [line for line in output.splitlines() if "ERROR/" in line]
    assert len(errors) == 1, output
    # kombu shows a Redis URL without a password as rediss://:**@host (its masking)
    assert f"127.0.0.1:{tls_redis.port}/0: TLS: " in errors[0]
    assert errors[0].endswith(
        f"TLS: the broker's certificate is not signed by a CA in broker_tls_ca_file {other} "
        f"(certificate verify failed: self-signed certificate in certificate chain)")


def test_a_rediss_host_the_brokers_certificate_does_not_hold_exits_2(
        tls_redis: TlsRedis, tmp_path: Path) -> None:
    url = f"rediss://{OTHER_HOST}:{tls_redis.port}/0"
    done = submit(tls_redis.env(tmp_path, CHIFFON_BROKER_URL=url))
    assert done.returncode == 2
    assert the_one_line(done) == (
        f"broker {url}: TLS: the broker's certificate does not hold the name '{OTHER_HOST}' "
        f"(the host of the broker URL) (certificate verify failed: IP address mismatch, "
        f"certificate is not valid for '{OTHER_HOST}'.); reissue it with that name, or write a "
        f"name it holds in the broker URL")


def test_without_a_client_certificate_a_rediss_broker_that_requires_one_is_exit_2(
        tls_redis: TlsRedis, tmp_path: Path) -> None:
    done = submit(tls_redis.env(tmp_path, CHIFFON_BROKER_TLS_CERT_FILE="",
                                CHIFFON_BROKER_TLS_KEY_FILE=""))
    assert done.returncode == 2
    assert the_one_line(done) == (
        f"broker {tls_redis.url}: TLS: the broker requires a client certificate (tlsv13 "
        f"alert certificate required); set broker_tls_cert_file and broker_tls_key_file")
