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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import missing_service
from tests.integration.helpers import CELERY, unique
from tests.integration.private_rabbit import free_port, port_open
from tests.integration.tls_clients import (
    EXIT_TIMEOUT_S,
    START_TIMEOUT_S,
    Fleet,
    chiffon,
    running_fleet,
    status_of,
    submit,
    the_one_line,
    tls_env,
)
from tests.throwaway_ca import Pki, make_pki
from tests.throwaway_ca import available as ca_available
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

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
        """A correct client's environment (:func:`~tests.integration.tls_clients.tls_env`)."""
        return tls_env(self.url, self.pki, self.root, home, **changes)


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


@pytest.fixture(scope="module")
def fleet(tls_redis: TlsRedis) -> Iterator[Fleet]:
    env = tls_redis.env(tls_redis.root / "home-cli", CHIFFON_LOG_LEVEL="INFO")
    with running_fleet(env, tls_redis.url, tls_redis.root) as running:
        yield running


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
