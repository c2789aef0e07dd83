"""Run the agent the way users do and watch it from the outside, on a real broker.

- :func:`start_agent`: ``celery -A chiffon_worker worker -B`` (no other flags) as a
  subprocess with a unique agent id and pool, a clean environment, its working directory
  in a temp dir and its output in a log file.
- :class:`HeartbeatTap`: a private queue bound to the heartbeat exchange with the
  heartbeat routing key, so it gets a copy of every heartbeat without taking any from
  ``chiffon.heartbeats``; it keeps those of one agent.
- :func:`delete_agent_queues`: remove what an agent declared (its two queues and their
  exchanges), so the broker is left as it was found.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from celery import Celery
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.exceptions import OperationalError
from kombu.message import Message
from kombu.messaging import Consumer

from chiffon_worker.wire import EXECUTE_WORK_TASK, HEARTBEAT_QUEUE, HEARTBEAT_TASK

CELERY = Path(sys.executable).parent / "celery"
#: Heartbeats of test agents expire quickly, so the shared queue never backs up.
TEST_HEARTBEAT_TIMEOUT_S = 5
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


def unique(prefix: str) -> str:
    """A name no other test (or test run) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def agent_environment(home: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """``os.environ`` without CHIFFON_* variables, HOME under the test's temp dir, + extra."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("CHIFFON_") and name != "YAML_LOADER_FOR_DYNACONF"}
    env.update(HOME=str(home), XDG_STATE_HOME=str(home / "state"), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@dataclass
class Agent:
    """A running ``celery -A chiffon_worker worker -B``."""

    popen: subprocess.Popen[bytes]
    agent_id: str
    pool: str
    broker_url: str
    cwd: Path
    log_path: Path
    spawned_at: float  # time.time() just before the process was started

    @property
    def nodename(self) -> str:
        """The worker's node name: ``<agent_id>@<host>`` unless ``-n`` says otherwise."""
        match = re.search(r"(\S+@\S+) ready\.$", self.log(), re.MULTILINE)
        if match is None:
            raise AssertionError(f"agent {self.agent_id} never said ready:\n{self.log()}")
        return match.group(1)

    @property
    def agent_queue(self) -> str:
        return f"chiffon.agent.{self.agent_id}"

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tree(self) -> list[psutil.Process]:
        """The worker process and its children (pool processes, a hung GPU tool)."""
        try:
            parent = psutil.Process(self.popen.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def wait_for_log(self, pattern: str, timeout: float = READY_TIMEOUT_S,
                     count: int = 1) -> str:
        """Wait until ``pattern`` (a regex) matched ``count`` lines; returns the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if len(re.findall(pattern, text, re.MULTILINE)) >= count:
                return text
            if not self.alive:
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not seen {count}x in the log of agent "
                             f"{self.agent_id} (alive: {self.alive}):\n{self.log()}")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        self.wait_for_log(r" ready\.$", timeout)

    def stop(self) -> int | None:
        """SIGTERM (warm shutdown), SIGKILL if it lingers; returns the exit status."""
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL (a crash, a power cut)."""
        with suppress(ProcessLookupError):
            self.popen.kill()
        self.popen.wait(STOP_TIMEOUT_S)


def start_agent(tmp: Path, broker_url: str, *, agent_id: str | None = None,
                pool: str | None = None, interval: float = 1.0,
                extra_env: Mapping[str, str] | None = None) -> Agent:
    """Start ``celery -A chiffon_worker worker -B`` with cwd and HOME inside ``tmp``."""
    agent_id = agent_id or unique("t-agent")
    pool = pool or unique("t-pool")
    home = tmp / f"home-{agent_id}"
    cwd = tmp / f"cwd-{agent_id}"
    home.mkdir(parents=True)
    cwd.mkdir(parents=True)
    env = agent_environment(home, {
        "CHIFFON_BROKER_URL": broker_url,
        "CHIFFON_AGENT_ID": agent_id,
        "CHIFFON_AGENT_POOL_NAME": pool,
        "CHIFFON_HEARTBEAT_INTERVAL": f"{interval:g}",
        "CHIFFON_HEARTBEAT_TIMEOUT_SECONDS": str(TEST_HEARTBEAT_TIMEOUT_S),
        **(extra_env or {}),
    })
    log_path = tmp / f"{agent_id}.log"
    spawned_at = time.time()
    with log_path.open("wb") as log:
        popen = subprocess.Popen([str(CELERY), "-A", "chiffon_worker", "worker", "-B"],
                                 env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    return Agent(popen, agent_id, pool, broker_url, cwd, log_path, spawned_at)


@contextmanager
def running_agent(tmp: Path, broker_url: str, **kwargs: Any) -> Iterator[Agent]:
    """An agent for the duration of the block; stopped and its queues deleted after."""
    agent = start_agent(tmp, broker_url, **kwargs)
    try:
        yield agent
    finally:
        agent.stop()
        delete_agent_queues(broker_url, agent.pool, agent.agent_queue)


def delete_agent_queues(broker_url: str, *names: str) -> None:
    """Delete queues (and their same-named exchanges) an agent or a test declared."""
    with Connection(broker_url) as conn:
        channel = conn.default_channel
        for name in names:
            exchange = Exchange(name, type="direct")
            queue = Queue(name, exchange, routing_key=name)(channel)
            queue.declare()  # (kombu's Redis transport deletes only bindings it knows)
            queue.delete()
            exchange(channel).delete()


def queue_depth(broker_url: str, name: str) -> int:
    """Messages ready in queue ``name`` (RabbitMQ: not counting unacknowledged ones)."""
    with Connection(broker_url) as conn:
        return int(conn.default_channel.queue_declare(name, passive=True).message_count)


def queue_consumers(broker_url: str, name: str) -> int:
    """Consumers of queue ``name`` (RabbitMQ)."""
    with Connection(broker_url) as conn:
        return int(conn.default_channel.queue_declare(name, passive=True).consumer_count)


@dataclass(frozen=True)
class Heartbeat:
    """One heartbeat as received."""

    snapshot: dict[str, Any]
    received_at: float  # time.time() at receipt
    args: list[Any]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    properties: dict[str, Any]


@dataclass
class HeartbeatTap:
    """Copies of one agent's heartbeats, from a private queue bound to the heartbeat
    exchange. ``durable`` keeps the queue (and its binding) across a broker restart."""

    broker_url: str
    agent_id: str
    durable: bool = False
    received: list[Heartbeat] = field(default_factory=list)

    def __post_init__(self) -> None:
        exchange = Exchange(HEARTBEAT_QUEUE, type="direct", durable=True)
        self.queue = Queue(unique("test.heartbeats"), exchange, routing_key=HEARTBEAT_QUEUE,
                           durable=self.durable, auto_delete=not self.durable)
        self._errors = (OSError, OperationalError,
                        *Connection(self.broker_url).connection_errors)
        self._connection: Connection | None = None
        self._connect()

    def _connect(self) -> None:
        connection = Connection(self.broker_url)
        consumer = Consumer(connection.channel(), [self.queue],
                            callbacks=[self._on_message], accept=["json"])
        consumer.consume()
        self._connection = connection

    def _on_message(self, body: Any, message: Message) -> None:
        message.ack()
        if message.headers.get("task") != HEARTBEAT_TASK:
            return
        args, kwargs, _ = body  # Celery message protocol 2
        snapshot = args[0] if args and isinstance(args[0], dict) else {}
        if snapshot.get("agent_id") == self.agent_id:
            self.received.append(Heartbeat(snapshot, time.time(), list(args), dict(kwargs),
                                           dict(message.headers), dict(message.properties)))

    def drain(self, seconds: float) -> None:
        """Receive for ``seconds``; after a broker outage, reconnects as soon as it can."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            connection = self._connection
            try:
                if connection is None:
                    self._connect()
                    continue
                connection.drain_events(timeout=min(left, 0.2))
            except TimeoutError:
                continue
            except self._errors:
                self.close()
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def wait_for(self, count: int, timeout: float) -> list[Heartbeat]:
        """Wait until ``count`` heartbeats were received in all; returns all received."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            self.drain(0.2)
        return list(self.received)

    def wait_until(self, predicate: Callable[[dict[str, Any]], bool],
                   timeout: float) -> Heartbeat | None:
        """The first heartbeat received from now on whose snapshot satisfies ``predicate``
        (None after ``timeout`` seconds)."""
        seen = len(self.received)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.drain(0.2)
            for beat in self.received[seen:]:
                if predicate(beat.snapshot):
                    return beat
            seen = len(self.received)
        return None

    def since(self, wall_time: float) -> list[Heartbeat]:
        """The heartbeats received at or after ``wall_time`` (time.time())."""
        return [beat for beat in self.received if beat.received_at >= wall_time]

    def close(self) -> None:
        if self._connection is not None:
            with suppress(*self._errors):
                self._connection.release()
            self._connection = None

    def delete(self) -> None:
        """Close and delete the tap's queue."""
        self.close()
        with Connection(self.broker_url) as conn:
            queue = self.queue(conn.default_channel)
            queue.declare()
            queue.delete()


def work_client(broker_url: str, result_backend: str) -> Celery:
    """A submitter: JSON only, results on ``result_backend``."""
    client = Celery(unique("t-client"), set_as_current=False)
    client.conf.update(broker_url=broker_url, result_backend=result_backend,
                       task_serializer="json", result_serializer="json",
                       accept_content=["json"], result_accept_content=["json"],
                       broker_connection_retry_on_startup=True)
    return client


def close_client(client: Celery) -> None:
    """Delete the client's ``rpc://`` reply queue (it would linger for a day) and close."""
    if client.conf.result_backend == "rpc://":
        with client.connection_for_write() as conn:
            client.backend.binding(conn.default_channel).delete()
    client.close()


def submit(client: Celery, pool: str, request: Any, timeout: float = 20.0) -> Any:
    """Send ``chiffon.execute_work`` to ``pool`` and wait for its result."""
    result = client.send_task(EXECUTE_WORK_TASK, args=[request], queue=pool)
    try:
        return result.get(timeout=timeout)
    finally:
        result.forget()
