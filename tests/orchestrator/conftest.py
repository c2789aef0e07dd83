"""Fixtures for orchestrator tests: registries on SQLite and PostgreSQL, private queues,
a running consumer, and publishers that send what agents send.

Every test gets its own queue (``chiffon.test.<uuid>``) and, on PostgreSQL, its own schema
(``chiffon_test_<run>_<n>``), both removed afterwards, so tests never see each other's
data nor disturb other suites using the same services.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Producer
from sqlalchemy import create_engine, text

from chiffon_worker.orchestrator.heartbeat_consumer import HeartbeatConsumer
from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.wire import heartbeat_queue
from tests.conftest import POSTGRES_URL, require_port

from . import feeding

RUN_ID = uuid.uuid4().hex[:8]
_SCHEMA_NUMBERS = itertools.count(1)


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
             ) -> Any:
    """Poll ``condition`` every 20 ms until truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def _pg_schemas() -> Iterator[list[str]]:
    created: list[str] = []
    yield created
    if created:
        engine = create_engine(POSTGRES_URL)
        with engine.begin() as conn:
            for schema in created:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture
def pg_schema(_pg_schemas: list[str]) -> Iterator[str]:
    """A fresh PostgreSQL schema name for one test; dropped afterwards."""
    require_port("127.0.0.1", 5432, "PostgreSQL")
    schema = f"chiffon_test_{RUN_ID}_{next(_SCHEMA_NUMBERS)}"
    _pg_schemas.append(schema)
    yield schema
    engine = create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()
    _pg_schemas.remove(schema)


class RegistryFactory:
    """Opens registries on one database (the same one on every call within a test)."""

    def __init__(self, backend: str, url: str, schema: str | None) -> None:
        self.backend = backend
        self.url = url
        self.schema = schema
        self.opened: list[Registry] = []

    def __call__(self, **kwargs: Any) -> Registry:
        registry = Registry(self.url, schema=self.schema, **kwargs)
        self.opened.append(registry)
        return registry


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_factory(request: pytest.FixtureRequest, tmp_path: Path
                     ) -> Iterator[RegistryFactory]:
    """Opens registries on SQLite (in tmp_path) and on the machine's PostgreSQL."""
    if request.param == "sqlite":
        factory = RegistryFactory("sqlite", f"sqlite:///{tmp_path / 'state' / 'reg.sqlite3'}",
                                  None)
    else:
        schema = request.getfixturevalue("pg_schema")
        factory = RegistryFactory("postgresql", POSTGRES_URL, schema)
    yield factory
    for registry in factory.opened:
        registry.close()


@pytest.fixture
def registry(registry_factory: RegistryFactory) -> Registry:
    """A fresh registry, on SQLite and on PostgreSQL."""
    return registry_factory()


@pytest.fixture
def sqlite_registry(tmp_path: Path) -> Iterator[Registry]:
    """A fresh SQLite registry (for tests of logic that does not depend on the database)."""
    registry = Registry(f"sqlite:///{tmp_path / 'reg.sqlite3'}")
    yield registry
    registry.close()


@pytest.fixture
def queue_name(rabbitmq_url: str) -> Iterator[str]:
    """A private heartbeat queue on the machine's RabbitMQ; deleted afterwards."""
    name = f"chiffon.test.{uuid.uuid4().hex}"
    yield name
    with Connection(rabbitmq_url) as conn:
        channel = conn.channel()
        bound = heartbeat_queue(name)(channel)
        bound.delete()
        bound.exchange.delete()


def queue_depth(url: str, name: str) -> int:
    """Messages ready in queue ``name`` (not counting unacked ones)."""
    with Connection(url) as conn:
        _, count, _ = conn.default_channel.queue_declare(queue=name, passive=True)
        return int(count)


class Publisher:
    """Sends to one queue: raw bodies (anything at all) or Celery heartbeat tasks."""

    def __init__(self, url: str, queue: str) -> None:
        self.url = url
        self.queue = heartbeat_queue(queue)
        self.connection = Connection(url)
        self.producer = Producer(self.connection.default_channel)
        self.queue(self.connection.default_channel).declare()
        self._celery: Celery | None = None

    def raw(self, body: bytes | str, *, content_type: str = "application/json",
            headers: dict[str, Any] | None = None) -> None:
        """Publish ``body`` unchanged (no serializer) with the given properties."""
        self.producer.publish(body, exchange=self.queue.exchange,
                              routing_key=self.queue.routing_key,
                              content_type=content_type, content_encoding="utf-8",
                              headers=headers or {}, serializer=None)

    def task_body(self, snapshot: Any, task: str = "chiffon.heartbeat",
                  expires: float | None = None) -> None:
        """Publish a Celery protocol-2 task message by hand (any argument, any task name)."""
        headers: dict[str, Any] = {"lang": "py", "task": task, "id": str(uuid.uuid4())}
        if expires is not None:
            headers["expires"] = expires
        body = json.dumps([[snapshot], {}, {"callbacks": None, "errbacks": None,
                                            "chain": None, "chord": None}])
        self.raw(body, headers=headers)

    @property
    def celery(self) -> Celery:
        if self._celery is None:
            app = Celery("chiffon-test-agent", broker=self.url, set_as_current=False)
            app.conf.update(task_serializer="json", accept_content=["json"])
            self._celery = app
        return self._celery

    def heartbeat(self, snapshot: dict[str, Any], expires: float = 90.0) -> None:
        """Publish a heartbeat exactly as an agent does: Celery ``send_task``."""
        self.celery.send_task("chiffon.heartbeat", args=[snapshot], queue=self.queue,
                              expires=expires)

    def close(self) -> None:
        if self._celery is not None:
            self._celery.close()
        self.connection.release()


@pytest.fixture
def publisher(rabbitmq_url: str, queue_name: str) -> Iterator[Publisher]:
    """A publisher on the test's private queue."""
    pub = Publisher(rabbitmq_url, queue_name)
    yield pub
    pub.close()


class RunningConsumer:
    """A HeartbeatConsumer running in a thread, with its judge and writer."""

    def __init__(self, consumer: HeartbeatConsumer) -> None:
        self.consumer = consumer
        self.writer = consumer.writer
        self.stats = consumer.stats
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-consumer", daemon=True)

    def _run(self) -> None:
        try:
            self.consumer.run()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def start(self) -> RunningConsumer:
        self.thread.start()
        wait_for(self.consumer.ready.is_set, what="the consumer to be ready")
        return self

    def settled(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` messages were judged and nothing is left uncommitted."""
        stats = self.stats

        def done() -> bool:
            judged = stats.accepted + stats.rejected_total + stats.ignored_total
            return judged >= count and self.writer.pending == 0

        wait_for(done, timeout, f"{count} messages to be judged and committed")

    def stop(self) -> None:
        self.consumer.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "consumer did not stop"


@pytest.fixture
def start_consumer(rabbitmq_url: str, queue_name: str
                   ) -> Iterator[Callable[..., RunningConsumer]]:
    """Start a consumer on the test's queue: ``start_consumer(registry, secret=...)``."""
    running: list[RunningConsumer] = []

    def start(registry: Registry, *, secret: str = "", **options: Any) -> RunningConsumer:
        options.setdefault("max_delay_seconds", 0.05)
        options.setdefault("poll_seconds", 0.05)
        consumer = feeding.consumer(rabbitmq_url, registry, secret=secret, queue=queue_name,
                                    **options)
        handle = RunningConsumer(consumer).start()
        running.append(handle)
        return handle

    yield start
    for handle in running:
        if handle.thread.is_alive():
            handle.stop()


@pytest.fixture(autouse=True)
def fresh_now(request: pytest.FixtureRequest) -> None:
    """A test module's ``NOW`` becomes the start of each test. Liveness is judged against
    the real clock, so a value from import time would turn these agents offline once the
    suite before them ran longer than their timeout."""
    if hasattr(request.module, "NOW"):
        request.module.NOW = time.time()


def _closing(factory: RegistryFactory) -> Iterator[RegistryFactory]:
    yield factory
    for registry in factory.opened:
        registry.close()


@pytest.fixture
def on_postgresql(pg_schema: str) -> Iterator[RegistryFactory]:
    """Registries (several connections) on one PostgreSQL schema."""
    yield from _closing(RegistryFactory("postgresql", POSTGRES_URL, pg_schema))


@pytest.fixture
def on_sqlite(tmp_path: Path) -> Iterator[RegistryFactory]:
    """Registries on one SQLite file."""
    yield from _closing(RegistryFactory("sqlite", f"sqlite:///{tmp_path / 'reg.sqlite3'}",
                                        None))
