"""A real ``chiffon orchestrator`` on a private RabbitMQ virtual host, for the tests and
benchmarks that watch agents the way users do (other programs share the machine's broker,
so each gets a vhost of its own, deleted afterwards)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.integration.helpers import READY_TIMEOUT_S, agent_environment

CHIFFON = Path(sys.executable).parent / "chiffon"
#: What the orchestrator logs once it follows worker events (its last start-up step).
FOLLOWING_EVENTS = "following worker events on"


class VhostUnavailable(RuntimeError):
    """A private vhost cannot be made here (no rabbitmqctl, or it failed)."""


def rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True,
                          timeout=60, check=False)


@contextmanager
def private_vhost(broker_url: str) -> Iterator[str]:
    """A new vhost on the broker of ``broker_url`` (guest may use it); yields its URL."""
    vhost = f"chiffon_t_{uuid.uuid4().hex[:12]}"
    try:
        added = rabbitmqctl("add_vhost", vhost)
    except FileNotFoundError:
        raise VhostUnavailable("rabbitmqctl not on PATH (needed for a private vhost)") from None
    if added.returncode != 0:
        raise VhostUnavailable(f"cannot add a RabbitMQ vhost: {added.stderr.strip()}")
    try:
        granted = rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        if granted.returncode != 0:
            raise VhostUnavailable(f"cannot set permissions: {granted.stderr.strip()}")
        yield urlunsplit(urlsplit(broker_url)._replace(path=f"/{vhost}"))
    finally:
        rabbitmqctl("delete_vhost", vhost)


@dataclass
class Orchestrator:
    """A running ``chiffon orchestrator``."""

    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM (a clean stop); returns the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(15)
        return self.popen.returncode


def start_orchestrator(env: dict[str, str], log_path: Path) -> Orchestrator:
    with log_path.open("wb") as log:
        popen = subprocess.Popen([str(CHIFFON), "orchestrator", "--metrics-port", "0"],
                                 env=env, stdout=log, stderr=subprocess.STDOUT)
    return Orchestrator(popen, log_path)


@dataclass
class OrchestratorOnVhost:
    """An orchestrator following ``url``: the environment ``chiffon`` commands need to
    see its registry, and that registry's URL."""

    url: str
    env: dict[str, str]
    registry_url: str
    orchestrator: Orchestrator


@contextmanager
def orchestrator_on(url: str, tmp: Path) -> Iterator[OrchestratorOnVhost]:
    """``chiffon orchestrator`` on broker ``url`` (SQLite registry under ``tmp``), from the
    moment it follows worker events until the block ends."""
    state = tmp / "orchestrator-state"
    env = agent_environment(tmp / "orchestrator-home", {
        "CHIFFON_BROKER_URL": url, "CHIFFON_STATE_DIR": str(state), "CHIFFON_LOG_LEVEL": "INFO"})
    orchestrator = start_orchestrator(env, tmp / "orchestrator.log")
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while FOLLOWING_EVENTS not in orchestrator.log():
            if orchestrator.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"orchestrator never followed events:\n{orchestrator.log()}")
            time.sleep(0.05)
        yield OrchestratorOnVhost(url, env, f"sqlite:///{state / 'registry.sqlite3'}",
                                  orchestrator)
    finally:
        orchestrator.stop()
