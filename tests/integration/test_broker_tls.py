"""TLS to the broker, end to end, on a private RabbitMQ node with a TLS listener that
requires a client certificate (``verify_peer`` + ``fail_if_no_peer_cert``), and a
throwaway CA made by ``openssl`` (tests/throwaway_ca.py).

An agent and an orchestrator over ``amqps://`` run for the module (Flower, with the same
settings, lists the agent); every way TLS can go wrong (wrong CA, expired certificate,
wrong name, no or a rejected client certificate, an unreadable key, TLS options in the
URL) stops the agent, the orchestrator and ``chiffon submit`` with one line and exit
status 2, no traceback (systemd's ``RestartPreventExitStatus=2`` then leaves them stopped
instead of looping). Redis over TLS: tests/integration/test_broker_tls_redis.py.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import ssl
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from chiffon_worker.broker_tls import BrokerTls, server_alert
from tests.conftest import missing_service
from tests.integration import private_rabbit
from tests.integration.helpers import CELERY, unique
from tests.integration.tls_clients import (
    EXIT_TIMEOUT_S,
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

FLOWER_USER, FLOWER_PASSWORD = "operator", "s3cret-test-only"


@dataclass
class TlsNode:
    """The private node, its CA, and the environment of a correctly configured client."""

    node: private_rabbit.PrivateRabbit
    pki: Pki
    url: str  # amqps://guest:guest@127.0.0.1:<tls port>//
    root: Path

    def env(self, home: Path, **changes: str) -> dict[str, str]:
        """A correct client's environment (:func:`~tests.integration.tls_clients.tls_env`)."""
        return tls_env(self.url, self.pki, self.root, home, **changes)


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsNode]:
    why_not = private_rabbit.available() or ca_available()
    if why_not:
        missing_service(f"private RabbitMQ node with TLS: {why_not}")
    root = tmp_path_factory.mktemp("broker-tls")
    pki = make_pki(root / "pki")
    node = private_rabbit.PrivateRabbit(tls=private_rabbit.NodeTls(
        pki.cert("ca"), pki.cert("server"), pki.key("server"), require_client_cert=True))
    try:
        node.start()
        assert node.tls_url is not None
        yield TlsNode(node, pki, node.tls_url, root)
    finally:
        node.destroy()


@pytest.fixture(scope="module")
def fleet(tls_node: TlsNode) -> Iterator[Fleet]:
    env = tls_node.env(tls_node.root / "home-cli", CHIFFON_LOG_LEVEL="INFO")
    with running_fleet(env, tls_node.url, tls_node.root) as running:
        yield running


def shown(url: str) -> str:
    return url.replace("guest:guest@", "guest:**@")


# -- over TLS, everything works ---------------------------------------------------------------


def test_an_agent_over_tls_sends_heartbeats_an_orchestrator_over_tls_stores(
        fleet: Fleet) -> None:
    row = wait_until(lambda: (found := status_of(fleet.env, fleet.agent.agent_id))
                     and found["last_event_at"] and found,
                     30, lambda: f"a heartbeat and a worker event in the registry:\n"
                                 f"{fleet.orchestrator.log()}")
    assert row["state"] == "online"
    assert row["liveness"] == "online"  # worker events came over TLS too


def test_submit_over_tls_runs_work_on_the_agent_and_returns_its_result(fleet: Fleet) -> None:
    done = chiffon(fleet.env, "submit", "sleep", '{"seconds": 0}', "--pool", fleet.agent.pool,
                   "--wait", "--timeout", "30")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["status"], result["agent_id"]) == ("success", fleet.agent.agent_id)


def _flower_workers(url: str) -> dict[str, Any] | None:
    """Flower's ``/api/workers`` answer (basic auth), None while it does not answer."""
    request = urllib.request.Request(url)
    token = base64.b64encode(f"{FLOWER_USER}:{FLOWER_PASSWORD}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            answer: dict[str, Any] = json.load(response)
            return answer
    except (urllib.error.URLError, ConnectionError):
        return None


def test_flower_with_the_agents_tls_settings_lists_the_agent_over_tls(
        fleet: Fleet, tls_node: TlsNode, tmp_path: Path) -> None:
    # `celery -A chiffon_worker flower` takes the agent app's settings: broker_use_ssl too
    port = private_rabbit.free_port()
    env = tls_node.env(tmp_path / "home", CHIFFON_AGENT_ID=unique("t-flower"))
    log_path = tmp_path / "flower.log"
    with log_path.open("wb") as log:
        flower = subprocess.Popen(
            [str(CELERY), "-A", "chiffon_worker", "flower", "--address=127.0.0.1",
             f"--port={port}", f"--basic-auth={FLOWER_USER}:{FLOWER_PASSWORD}"],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    nodename = fleet.agent.nodename
    url = (f"http://127.0.0.1:{port}/api/workers?refresh=1&workername="
           f"{urllib.parse.quote(nodename)}")

    def agent_listed() -> dict[str, Any] | None:
        assert flower.poll() is None, log_path.read_text(errors="replace")
        answer = _flower_workers(url)
        return answer if answer and nodename in answer else None

    try:
        workers = wait_until(agent_listed, 30, lambda: f"Flower to list {nodename}:\n"
                                                     f"{log_path.read_text(errors='replace')}",
                             interval=0.2)
    finally:
        flower.send_signal(signal.SIGTERM)
        try:
            flower.wait(10)
        except subprocess.TimeoutExpired:
            flower.kill()
            flower.wait(10)
    assert workers[nodename]["stats"]["pid"] == fleet.agent.popen.pid  # the agent answered
    flower_log = log_path.read_text(errors="replace")
    assert f"Broker: {shown(tls_node.url)}" in flower_log  # the TLS port, nothing else
    failures = [line for line in flower_log.splitlines()
                if "Failed to capture events" in line or "Inspect method" in line]
    assert failures == []


# -- the wrong CA: one line, exit 2, for every program ----------------------------------------


def test_submit_with_the_wrong_ca_exits_2_naming_the_ca_file(tls_node: TlsNode,
                                                            tmp_path: Path) -> None:
    other = tls_node.pki.cert("other-ca")
    done = submit(tls_node.env(tmp_path, CHIFFON_BROKER_TLS_CA_FILE=str(other)))
    assert done.returncode == 2
    assert the_one_line(done) == (
        f"broker {shown(tls_node.url)}: TLS: the broker's certificate is not signed by a CA "
        f"in broker_tls_ca_file {other} (certificate verify failed: self-signed certificate "
        f"in certificate chain)")


def test_an_agent_with_the_wrong_ca_stops_with_one_error_line_and_exit_2(
        tls_node: TlsNode, tmp_path: Path) -> None:
    other = tls_node.pki.cert("other-ca")
    env = tls_node.env(tmp_path / "home", CHIFFON_BROKER_TLS_CA_FILE=str(other),
                       CHIFFON_AGENT_ID=unique("t-agent"), CHIFFON_LOG_LEVEL="")
    done = subprocess.run([str(CELERY), "-A", "chiffon_worker", "worker", "-B"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=EXIT_TIMEOUT_S,
                          check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output and "CRITICAL" not in output
    errors = [line for line in output.splitlines() if "ERROR/" in line]
    assert len(errors) == 1, output
    assert errors[0].endswith(
        f"broker {shown(tls_node.url)}: TLS: the broker's certificate is not signed by a CA "
        f"in broker_tls_ca_file {other} (certificate verify failed: self-signed certificate "
        f"in certificate chain)")


def test_an_orchestrator_with_the_wrong_ca_stops_with_one_line_and_exit_2(
        tls_node: TlsNode, tmp_path: Path) -> None:
    other = tls_node.pki.cert("other-ca")
    env = tls_node.env(tmp_path, CHIFFON_BROKER_TLS_CA_FILE=str(other),
                       CHIFFON_STATE_DIR=str(tmp_path / "state"))
    done = chiffon(env, "orchestrator", "--metrics-port", "0")
    assert done.returncode == 2
    assert the_one_line(done).startswith(
        f"broker {shown(tls_node.url)}: TLS: the broker's certificate is not signed by a CA "
        f"in broker_tls_ca_file {other} ")


# -- the broker's certificate: expired, another name ------------------------------------------


@contextmanager
def tls_server(cert: Path, key: Path) -> Iterator[int]:
    """A TLS server on a free port presenting ``cert`` (handshakes only); yields its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn, suppress(OSError):
                conn.settimeout(5)
                context.wrap_socket(conn, server_side=True).close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_an_expired_broker_certificate_exits_2_saying_it_expired(tls_node: TlsNode,
                                                                 tmp_path: Path) -> None:
    pki = tls_node.pki
    with tls_server(pki.cert("server-expired"), pki.key("server-expired")) as port:
        url = f"amqps://guest:guest@127.0.0.1:{port}//"
        done = submit(tls_node.env(tmp_path, CHIFFON_BROKER_URL=url))
    assert done.returncode == 2
    assert the_one_line(done) == (
        f"broker {shown(url)}: TLS: the broker's certificate has expired (certificate verify "
        f"failed: certificate has expired); renew it on the broker")


def test_a_server_name_the_certificate_does_not_hold_exits_2_naming_the_setting(
        tls_node: TlsNode, tmp_path: Path) -> None:
    done = submit(tls_node.env(tmp_path, CHIFFON_BROKER_TLS_SERVER_NAME="rabbit.other.lab"))
    assert done.returncode == 2
    assert the_one_line(done) == (
        f"broker {shown(tls_node.url)}: TLS: the broker's certificate does not hold the name "
        f"broker_tls_server_name 'rabbit.other.lab' (certificate verify failed: Hostname "
        f"mismatch, certificate is not valid for 'rabbit.other.lab'.); reissue it with that "
        f"name, or set broker_tls_server_name to a name it holds")


def test_a_localhost_url_is_checked_against_the_name_localhost(tls_node: TlsNode,
                                                              tmp_path: Path) -> None:
    url = tls_node.url.replace("127.0.0.1", "localhost")
    done = submit(tls_node.env(tmp_path, CHIFFON_BROKER_URL=url))
    assert done.returncode == 0, done.stderr


# -- the client certificate the broker requires -----------------------------------------------


def test_without_a_client_certificate_the_broker_that_requires_one_is_exit_2(
        tls_node: TlsNode, tmp_path: Path) -> None:
    done = submit(tls_node.env(tmp_path, CHIFFON_BROKER_TLS_CERT_FILE="",
                               CHIFFON_BROKER_TLS_KEY_FILE=""))
    assert done.returncode == 2
    assert the_one_line(done) == (
        f"broker {shown(tls_node.url)}: TLS: the broker requires a client certificate "
        f"(tlsv13 alert certificate required); set broker_tls_cert_file and "
        f"broker_tls_key_file")


def test_the_probe_after_a_bare_eof_hears_the_brokers_verdict_on_the_client_certificate(
        tls_node: TlsNode) -> None:
    # under TLS 1.3 the verdict follows the handshake: the client's first write may see EOF
    without_cert = BrokerTls(str(tls_node.pki.cert("ca")))
    verdict = server_alert(without_cert, tls_node.url)
    assert verdict is not None and verdict.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"


def test_the_probe_hears_nothing_from_a_broker_that_accepts_the_client(
        tls_node: TlsNode) -> None:
    pki = tls_node.pki
    accepted = BrokerTls(str(pki.cert("ca")), str(pki.cert("client")), str(pki.key("client")))
    assert server_alert(accepted, tls_node.url, timeout=0.3) is None


def test_an_expired_client_certificate_is_refused_by_the_broker_with_exit_2(
        tls_node: TlsNode, tmp_path: Path) -> None:
    pki = tls_node.pki
    done = submit(tls_node.env(tmp_path,
                               CHIFFON_BROKER_TLS_CERT_FILE=str(pki.cert("client-expired")),
                               CHIFFON_BROKER_TLS_KEY_FILE=str(pki.key("client-expired"))))
    assert done.returncode == 2
    assert the_one_line(done) == (
        f"broker {shown(tls_node.url)}: TLS: the broker rejected the client certificate "
        f"broker_tls_cert_file {pki.cert('client-expired')}: it has expired (sslv3 alert "
        f"certificate expired)")


# -- config problems stop at load -------------------------------------------------------------


def test_an_unreadable_key_file_stops_submit_at_load_with_exit_2(tls_node: TlsNode,
                                                                tmp_path: Path) -> None:
    unreadable = tmp_path / "client.key"
    unreadable.mkdir()  # root reads any file whatever its mode; a directory it cannot
    done = submit(tls_node.env(tmp_path, CHIFFON_BROKER_TLS_KEY_FILE=str(unreadable)))
    assert done.returncode == 2
    assert the_one_line(done) == (
        f"environment CHIFFON_BROKER_TLS_KEY_FILE: broker_tls_key_file: cannot read "
        f"{unreadable}: Is a directory")


def test_tls_options_in_the_url_stop_the_agent_at_load_with_one_line(
        tls_node: TlsNode, tmp_path: Path) -> None:
    url = f"{tls_node.url}?ssl_ca_certs={tls_node.pki.cert('ca')}"
    env = tls_node.env(tmp_path / "home", CHIFFON_BROKER_URL=url)
    done = subprocess.run([str(CELERY), "-A", "chiffon_worker", "worker", "-B"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=EXIT_TIMEOUT_S,
                          check=False)
    assert done.returncode == 2
    assert (done.stdout + done.stderr).strip() == (
        "chiffon: error: environment CHIFFON_BROKER_URL: broker_url: TLS options in the URL "
        "are not supported (?ssl_ca_certs=); set broker_tls_ca_file in the config instead "
        "(docs/security.md)")


# -- Redis over TLS ---------------------------------------------------------------------------


def test_a_rediss_broker_with_the_wrong_ca_exits_2_naming_the_ca_file(
        tls_node: TlsNode, tmp_path: Path) -> None:
    # redis-py's handshake against the node's TLS port: it fails before any Redis command
    url = f"rediss://127.0.0.1:{tls_node.node.tls_port}/0"
    other = tls_node.pki.cert("other-ca")
    done = submit(tls_node.env(tmp_path, CHIFFON_BROKER_URL=url,
                               CHIFFON_BROKER_TLS_CA_FILE=str(other)))
    assert done.returncode == 2
    assert the_one_line(done) == (
        f"broker {url}: TLS: the broker's certificate is not signed by a CA in "
        f"broker_tls_ca_file {other} (certificate verify failed: self-signed certificate in "
        f"certificate chain)")
