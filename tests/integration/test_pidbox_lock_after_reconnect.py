"""After its connection is lost, an agent finds its remote-control queue still locked (as
when a RabbitMQ node stops and the cluster holds the lost connection's exclusive queue
for a moment): it retries, and lives on once the lock is gone, instead of taking itself
for a second agent of the same name and exiting.

The agent reaches the broker through a TCP relay the test controls: the relay drops the
agent's connections and refuses new ones while the test takes the agent's queue, then
lets the agent back in while the queue is still held."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from kombu import Connection, Queue

from tests.integration.helpers import running_agent
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


class Relay:
    """Forwards TCP connections from a local port to ``target``; :meth:`cut` drops every
    relayed connection and refuses new ones until :meth:`resume`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.open = threading.Event()
        self.open.set()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if not self.open.is_set():
                client.close()
                continue
            server = socket.create_connection(self.target)
            with self.lock:
                self.pairs.append((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open.clear()
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for end in pair:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()

    def resume(self) -> None:
        self.open.set()

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.fixture
def relayed(vhost: str) -> Iterator[tuple[str, Relay]]:
    """The private vhost's URL through a :class:`Relay`, and the relay."""
    parts = urlsplit(vhost)
    relay = Relay((parts.hostname or "127.0.0.1", parts.port or 5672))
    netloc = f"{parts.username}:{parts.password}@127.0.0.1:{relay.port}"
    try:
        yield urlunsplit(parts._replace(netloc=netloc)), relay
    finally:
        relay.close()


def test_a_remote_control_queue_still_locked_after_a_reconnect_is_waited_for(
        tmp_path: Path, vhost: str, relayed: tuple[str, Relay]) -> None:
    url, relay = relayed
    with running_agent(tmp_path, url) as agent:
        agent.wait_ready()
        pidbox = f"{agent.nodename}.celery.pidbox"
        with Connection(vhost) as holder:  # straight to the broker, not through the relay
            relay.cut()
            wait_until(lambda: _took_exclusively(holder, pidbox), 20.0,
                       "the broker to drop the agent's queue, and the test to take it")
            relay.resume()
            agent.wait_for_log("still holds the remote-control queue", timeout=30.0)
            assert agent.alive, agent.log()
        # the test's connection is gone, and its hold with it
        agent.wait_for_log(r"Connected to amqp", count=2, timeout=30.0)
        wait_until(lambda: "still holds" in agent.log() and agent.alive, 5.0,
                   "the agent to live on")
        log = agent.log()
        assert "another agent already runs" not in log, log
        assert "Traceback" not in log and "CRITICAL" not in log, log


def _took_exclusively(connection: Connection, name: str) -> bool:
    """Declare ``name`` exclusive on a new channel of ``connection``; False while another
    connection holds it (the agent's lost one, until the broker drops it)."""
    channel = connection.channel()
    try:
        Queue(name, exclusive=True, auto_delete=True)(channel).declare()
    except connection.channel_errors:
        return False
    return True
