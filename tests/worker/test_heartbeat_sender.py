"""A heartbeat is published without a ``task-sent`` event (no Celery worker ever runs it,
so Flower would keep it PENDING forever), while real work keeps its event; each
snapshot sent is kept as the agent's latest. On kombu's in-memory transport (the real
broker: tests/integration/test_flower.py)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu.entity import Exchange, Queue

from chiffon_worker.config import Config
from chiffon_worker.wire import EXECUTE_WORK_TASK, HEARTBEAT_QUEUE, HEARTBEAT_TASK
from chiffon_worker.worker.heartbeat_sender import HeartbeatSender
from chiffon_worker.worker.latest_snapshot import latest_snapshot
from chiffon_worker.worker.settings import celery_settings


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(environ={}, home=tmp_path, broker_url="memory://",
                  state_dir=str(tmp_path / "state"))


@pytest.fixture
def app(config: Config) -> Iterator[Celery]:
    made = Celery("t-heartbeat-events", set_as_current=False)
    made.config_from_object(celery_settings(config))
    yield made
    made.close()


@pytest.fixture
def taps(app: Celery) -> Iterator[tuple[Any, Any]]:
    """Queues receiving copies of task events and of heartbeats (unique names: the
    in-memory broker is shared by the whole test process)."""
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        events = Queue(f"t-events-{uuid.uuid4().hex}", Exchange("celeryev", type="topic"),
                       routing_key="task.#", auto_delete=True)(channel)
        beats = Queue(f"t-beats-{uuid.uuid4().hex}",
                      Exchange(HEARTBEAT_QUEUE, type="direct", durable=True),
                      routing_key=HEARTBEAT_QUEUE, auto_delete=True)(channel)
        events.declare()
        beats.declare()
        yield events, beats
        events.delete()
        beats.delete()


def _sender(app: Celery, config: Config) -> HeartbeatSender:
    numbers = itertools.count(1)
    return HeartbeatSender(app, config, lambda: {"agent_id": "a-1", "seq": next(numbers)})


def test_a_heartbeat_goes_out_without_a_task_sent_event(
        app: Celery, config: Config, taps: tuple[Any, Any]) -> None:
    events, beats = taps
    sender = _sender(app, config)
    try:
        assert sender.send()
    finally:
        sender.close()
    message = beats.get(no_ack=True)
    assert message is not None and message.headers["task"] == HEARTBEAT_TASK
    assert events.get(no_ack=True) is None


def test_the_heartbeat_message_is_unchanged(
        app: Celery, config: Config, taps: tuple[Any, Any]) -> None:
    _, beats = taps
    sender = _sender(app, config)
    try:
        sender.send()
    finally:
        sender.close()
    message = beats.get(no_ack=True)
    args, kwargs, _ = message.decode()
    assert args == [{"agent_id": "a-1", "seq": 1}] and kwargs == {}
    assert (message.headers["argsrepr"], message.headers["kwargsrepr"]) == ("(snapshot,)", "{}")
    assert message.properties["delivery_mode"] == 1


def test_work_sent_by_the_same_app_still_has_its_task_sent_event(
        app: Celery, taps: tuple[Any, Any]) -> None:
    events, _ = taps
    app.send_task(EXECUTE_WORK_TASK, args=[{"work_id": "w"}], ignore_result=True)
    event = events.get(no_ack=True)
    assert event is not None and event.payload["type"] == "task-sent"
    assert event.payload["name"] == EXECUTE_WORK_TASK


def test_each_snapshot_sent_is_kept_as_the_latest(
        app: Celery, config: Config, taps: tuple[Any, Any]) -> None:
    sender = _sender(app, config)
    try:
        sender.send()
        sender.send()
    finally:
        sender.close()
    kept = latest_snapshot().latest()
    assert kept is not None and kept.snapshot == {"agent_id": "a-1", "seq": 2}
