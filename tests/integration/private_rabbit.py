"""A private RabbitMQ node for tests that stop, restart or cut the broker.

The machine's node on 5672 is shared and must never be touched; this one runs on free
ports with its own directories (owned by the ``rabbitmq`` user, to whom the server drops
privileges) and its own config file (``/etc/rabbitmq/rabbitmq.conf`` pins the listener).
Restarting it with the same directories keeps durable queues and bindings.

With ``tls=NodeTls(...)`` the node also has a TLS listener (``tls_port``, ``tls_url``)
besides its plain one; the certificate files are copied into the node's directory (the
server runs as ``rabbitmq`` and cannot read a test's temp dir).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def available() -> str | None:
    """Why a private node cannot run here, or None when it can."""
    for tool in ("rabbitmq-server", "rabbitmqctl"):
        if shutil.which(tool) is None:
            return f"{tool} not on PATH"
    if os.geteuid() != 0:
        return "a private RabbitMQ node needs root (its files must belong to rabbitmq)"
    return None


@dataclass(frozen=True)
class NodeTls:
    """A TLS listener's files (PEM) and whether it requires a client certificate
    (``ssl_options.verify = verify_peer`` + ``fail_if_no_peer_cert = true``)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_client_cert: bool = False

    def conf_lines(self, base: Path, port: int) -> str:
        """rabbitmq.conf lines of the listener on ``port``, files under ``base``."""
        verify = "verify_peer" if self.require_client_cert else "verify_none"
        return (f"listeners.ssl.default = 127.0.0.1:{port}\n"
                f"ssl_options.cacertfile = {base / 'tls-ca.pem'}\n"
                f"ssl_options.certfile = {base / 'tls-cert.pem'}\n"
                f"ssl_options.keyfile = {base / 'tls-key.pem'}\n"
                f"ssl_options.verify = {verify}\n"
                f"ssl_options.fail_if_no_peer_cert = {str(self.require_client_cert).lower()}\n")


class PrivateRabbit:
    """One RabbitMQ node: ``start()``, ``stop()``, ``cut_connections()``, ``destroy()``.

    Its files live in a fresh directory under the system temp dir (pytest's are private
    to root, and the server runs as ``rabbitmq``). ``tls``: a TLS listener too.
    """

    def __init__(self, tls: NodeTls | None = None) -> None:
        base = Path(tempfile.mkdtemp(prefix="chiffon-rabbit-"))
        self.port = free_port()
        self.dist_port = free_port()
        tag = uuid.uuid4().hex[:8]
        self.nodename = f"chiffontest{tag}@localhost"
        self.base = base
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        (base / "mnesia").mkdir()
        (base / "log").mkdir()
        (base / "plugins").write_text("[].\n")
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        self.tls_port: int | None = None
        self.tls_url: str | None = None
        if tls is not None:
            self.tls_port = free_port()
            self.tls_url = f"amqps://guest:guest@127.0.0.1:{self.tls_port}//"
            for source, name in ((tls.ca_file, "tls-ca.pem"), (tls.cert_file, "tls-cert.pem"),
                                 (tls.key_file, "tls-key.pem")):
                shutil.copyfile(source, base / name)
            with (base / "rabbitmq.conf").open("a") as conf:
                conf.write(tls.conf_lines(base, self.tls_port))
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(base)], check=True)
        base.chmod(0o755)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.base / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq"),
        })
        return env

    def start(self, timeout: float = START_TIMEOUT_S) -> float:
        """Start the node; returns the monotonic time its AMQP port first accepted."""
        subprocess.run(["rabbitmq-server", "-detached"], env=self._env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_open(self.port) and (self.tls_port is None or port_open(self.tls_port)):
                return time.monotonic()
            time.sleep(0.02)
        raise TimeoutError(f"private RabbitMQ {self.nodename} not listening on "
                           f"{self.port} after {timeout:g} s; logs in {self.base / 'log'}")

    def _ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run(["rabbitmqctl", "-n", self.nodename, *args], env=self._env(),
                       check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=60)

    def stop(self) -> None:
        """Stop the node and wait until its port is closed."""
        self._ctl("stop")
        deadline = time.monotonic() + 30
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def cut_connections(self) -> None:
        """Close every client connection (the node stays up)."""
        self._ctl("close_all_connections", "test cut")

    def destroy(self) -> None:
        """Stop the node if it runs and remove its files."""
        if port_open(self.port):
            self._ctl("stop", check=False)
        shutil.rmtree(self.base, ignore_errors=True)
