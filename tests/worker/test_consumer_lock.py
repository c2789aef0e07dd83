"""The agent's remote-control queue found locked: a second agent at start, its own lost
connection after a reconnect (a RabbitMQ node stopping holds it for a moment)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from amqp.exceptions import ResourceLocked
from celery.worker.consumer import Consumer as CeleryConsumer

from chiffon_worker.errors import EXIT_CONFIG
from chiffon_worker.worker import consumer as consumer_module
from chiffon_worker.worker.consumer import PIDBOX_RELEASE_SECONDS, Consumer

LOCKED = "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'a@h.celery.pidbox'"


class Clock:
    """A fake monotonic clock that ``sleep`` advances."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(consumer_module.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(consumer_module.time, "sleep", fake.sleep)
    return fake


def consumer_whose_starts(monkeypatch: pytest.MonkeyPatch, locked_times: int | None,
                          *, lost_a_connection: bool) -> tuple[Consumer, list[str]]:
    """A consumer (no Celery worker behind it) whose Celery start meets a locked queue
    ``locked_times`` times (None: always), then starts; returns it and what happened."""
    happened: list[str] = []

    def start(_self: Any) -> str:
        if locked_times is None or happened.count("locked") < locked_times:
            happened.append("locked")
            raise ResourceLocked(reply_text=LOCKED, reply_code=405)
        happened.append("started")
        return "started"

    restart: Callable[[Any], None] = lambda _self: happened.append("restarted")  # noqa: E731
    monkeypatch.setattr(CeleryConsumer, "start", start)
    monkeypatch.setattr(Consumer, "restart_after_lock", restart)
    agent = Consumer.__new__(Consumer)
    agent.hostname = "a@h"
    agent.lost_a_connection = lost_a_connection
    return agent, happened


def test_a_locked_queue_at_start_is_a_second_agent_at_once(
        monkeypatch: pytest.MonkeyPatch, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    agent, happened = consumer_whose_starts(monkeypatch, 1, lost_a_connection=False)
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as stopped:
        agent.start()
    assert stopped.value.code == EXIT_CONFIG
    assert happened == ["locked"]
    assert [r.getMessage() for r in caplog.records] == [
        "another agent already runs as a@h on this broker (RESOURCE_LOCKED - cannot obtain "
        "exclusive access to locked queue 'a@h.celery.pidbox'); give this one its own "
        "agent_id (agent.yml or CHIFFON_AGENT_ID) or stop the other"]


def test_after_a_lost_connection_a_lock_that_clears_is_retried_and_the_agent_lives_on(
        monkeypatch: pytest.MonkeyPatch, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    agent, happened = consumer_whose_starts(monkeypatch, 3, lost_a_connection=True)
    with caplog.at_level(logging.WARNING):
        assert agent.start() == "started"
    assert happened == ["locked", "restarted"] * 3 + ["started"]
    assert clock.now == 103.0, "one second between tries"
    assert [r.levelname for r in caplog.records] == ["WARNING"] * 3
    assert "the connection this agent lost" in caplog.records[0].getMessage()


def test_after_a_lost_connection_a_lock_that_lasts_is_a_second_agent(
        monkeypatch: pytest.MonkeyPatch, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    agent, happened = consumer_whose_starts(monkeypatch, None, lost_a_connection=True)
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as stopped:
        agent.start()
    assert stopped.value.code == EXIT_CONFIG
    assert clock.now - 100.0 == PIDBOX_RELEASE_SECONDS
    assert happened.count("locked") == PIDBOX_RELEASE_SECONDS + 1
    assert caplog.records[-1].levelname == "ERROR"
    assert "another agent already runs as a@h" in caplog.records[-1].getMessage()
