"""The heartbeat consumer against the machine's RabbitMQ (a private queue per test)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.signing import sign_snapshot

from . import feeding
from .conftest import Publisher, RunningConsumer, queue_depth, wait_for
from .snapshots import make_snapshot

pytestmark = pytest.mark.integration
SECRET = "lab-secret"


def signed(snapshot: dict[str, Any]) -> dict[str, Any]:
    """Signed with the consumer's secret: such messages fail for their content alone."""
    return sign_snapshot(snapshot, SECRET)


BAD_MESSAGES: list[Any] = [
    pytest.param(lambda p: p.raw(b"\x00\xffnot json at all"), "not_json", id="not JSON"),
    pytest.param(lambda p: p.task_body(signed(make_snapshot(schema=99))), "schema_version",
                 id="wrong schema version"),
    pytest.param(lambda p: p.task_body(signed({"schema": 1, "agent_id": "x"})), "invalid",
                 id="missing keys"),
    pytest.param(lambda p: p.task_body(signed(make_snapshot(seq="7"))), "invalid",
                 id="wrong types"),
    pytest.param(lambda p: p.task_body(signed(make_snapshot(cpu_load_1min=-0.5))), "invalid",
                 id="negative numbers"),
    pytest.param(lambda p: p.raw(json.dumps(signed(make_snapshot(padding="x" * (10 << 20))))),
                 "too_large", id="a 10 MB payload"),
    pytest.param(lambda p: p.heartbeat(sign_snapshot(make_snapshot(), "wrong-key")),
                 "forged", id="forged signature"),
    pytest.param(lambda p: p.heartbeat(make_snapshot()), "unsigned", id="unsigned"),
    pytest.param(lambda p: p.raw(b"\x80\x04K\x01.", content_type="application/x-python-"
                                 "serialize"), "unsupported_content", id="pickle"),
]


@pytest.mark.parametrize(("send_bad", "reason"), BAD_MESSAGES)
def test_a_bad_heartbeat_is_rejected_counted_and_dropped_and_the_consumer_carries_on(
        sqlite_registry: Registry, publisher: Publisher, queue_name: str, rabbitmq_url: str,
        start_consumer: Callable[..., RunningConsumer], send_bad: Callable[[Publisher], None],
        reason: str) -> None:
    consumer = start_consumer(sqlite_registry, secret=SECRET)
    send_bad(publisher)
    consumer.settled(1)
    assert consumer.stats.rejected == {reason: 1}
    assert sqlite_registry.agents() == []
    publisher.heartbeat(sign_snapshot(make_snapshot("good", seq=1), SECRET))
    consumer.settled(2)
    assert consumer.stats.accepted == 1
    assert [r.agent_id for r in sqlite_registry.agents()] == ["good"]
    consumer.stop()
    assert consumer.error is None
    assert queue_depth(rabbitmq_url, queue_name) == 0, "rejected messages are not requeued"


def test_heartbeats_published_by_celery_send_task_are_recorded_in_batches(
        registry: Registry, publisher: Publisher, queue_name: str, rabbitmq_url: str,
        start_consumer: Callable[..., RunningConsumer]) -> None:
    consumer = start_consumer(registry, batch_size=50, prefetch_count=200,
                              max_delay_seconds=0.5)
    for n in range(300):
        publisher.heartbeat(make_snapshot(f"agent-{n % 30:02d}", seq=1 + n // 30))
    consumer.settled(300, timeout=20)
    consumer.stop()
    assert consumer.stats.accepted == 300
    assert consumer.stats.batches < 300 / 10, "writes are batched"
    records = registry.agents()
    assert len(records) == 30
    assert {r.seq for r in records} == {10}
    assert len(registry.history("agent-00")) == 10
    assert queue_depth(rabbitmq_url, queue_name) == 0


def test_messages_stay_in_the_queue_when_the_registry_cannot_commit_them(
        sqlite_registry: Registry, publisher: Publisher, queue_name: str, rabbitmq_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from chiffon_worker.errors import RegistryError

    def fail(*_args: Any, **_kwargs: Any) -> None:
        raise RegistryError("cannot write registry test: disk is full")

    monkeypatch.setattr(sqlite_registry, "_write_rows", fail)
    consumer = feeding.consumer(rabbitmq_url, sqlite_registry, queue=queue_name,
                                write_retry_delays=(0.05, 0.05), max_delay_seconds=0.05,
                                poll_seconds=0.05)
    for n in range(5):
        publisher.heartbeat(make_snapshot("a1", seq=n + 1))
    with pytest.raises(RegistryError, match="disk is full"):
        consumer.run()
    assert consumer.stats.write_errors == 3
    wait_for(lambda: queue_depth(rabbitmq_url, queue_name) == 5,
             what="the unacked messages to return to the queue")


def test_the_consumer_reconnects_after_its_broker_connection_is_cut(
        sqlite_registry: Registry, publisher: Publisher,
        start_consumer: Callable[..., RunningConsumer]) -> None:
    name = f"chiffon-test-{time.time_ns()}"
    consumer = start_consumer(sqlite_registry, connection_name=name,
                              reconnect_max_seconds=0.5)
    publisher.heartbeat(make_snapshot("a1", seq=1))
    consumer.settled(1)
    _close_rabbitmq_connection(name)
    wait_for(lambda: consumer.stats.connection_losses >= 1, what="the connection loss")
    wait_for(consumer.consumer.ready.is_set, what="the consumer to reconnect")
    publisher.heartbeat(make_snapshot("a1", seq=2))
    consumer.settled(2)
    record = sqlite_registry.agent("a1")
    assert record is not None and record.seq == 2
    consumer.stop()
    assert consumer.error is None


def _close_rabbitmq_connection(connection_name: str) -> None:
    """Close only our named connection (other suites share this RabbitMQ)."""
    listing = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid",
                              "client_properties"], capture_output=True, text=True,
                             timeout=30, check=False)
    if listing.returncode != 0:
        pytest.skip(f"rabbitmqctl unavailable: {listing.stderr.strip()[:200]}")
    pids = [line.split("\t")[0] for line in listing.stdout.splitlines()
            if connection_name in line]
    assert pids, f"no RabbitMQ connection named {connection_name}"
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test cut"],
                       capture_output=True, timeout=30, check=True)


def test_the_consumer_works_on_a_redis_broker_too(
        sqlite_registry: Registry, redis_url: str) -> None:
    from celery import Celery

    from chiffon_worker.wire import heartbeat_queue

    queue = f"chiffon.test.{time.time_ns()}"
    app = Celery("test-agent", broker=redis_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"])
    consumer = feeding.consumer(redis_url, sqlite_registry, queue=queue,
                                max_delay_seconds=0.05, poll_seconds=0.05)
    handle = RunningConsumer(consumer).start()
    try:
        for seq in (1, 2):
            app.send_task("chiffon.heartbeat", args=[make_snapshot("r1", seq=seq)],
                          queue=heartbeat_queue(queue), expires=90)
        app.send_task("chiffon.heartbeat", args=["not a snapshot"],
                      queue=heartbeat_queue(queue), expires=90)
        handle.settled(3)
    finally:
        handle.stop()
        app.close()
    assert handle.error is None
    assert (consumer.stats.accepted, dict(consumer.stats.rejected)) == (
        2, {"bad_envelope": 1})
    record = sqlite_registry.agent("r1")
    assert record is not None and record.seq == 2
    from kombu import Connection

    with Connection(redis_url) as conn:
        channel = conn.default_channel
        assert channel.client.llen(queue) == 0, "all consumed"
        assert not any(queue.encode() in value for value in
                       channel.client.hvals(channel.unacked_key)), "all acked"
        heartbeat_queue(queue)(channel).delete()
