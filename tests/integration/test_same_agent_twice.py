"""A second agent started with the id of one already running on the same host (a second
``celery worker`` beside the service, a cloned machine with the same hostname) stops at
once with one line and exit status 2, which the shipped systemd unit does not restart;
the first agent is not disturbed."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import (
    STOP_TIMEOUT_S,
    Agent,
    HeartbeatTap,
    delete_agent_queues,
    start_agent,
    unique,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def first_and_second(tmp_path: Path, rabbitmq_url: str) -> Iterator[tuple[Agent, Agent]]:
    agent_id, pool = unique("t-twice"), unique("t-pool")
    first = start_agent(tmp_path / "first", rabbitmq_url, agent_id=agent_id, pool=pool)
    second: Agent | None = None
    try:
        first.wait_ready()
        second = start_agent(tmp_path / "second", rabbitmq_url, agent_id=agent_id, pool=pool)
        with contextlib.suppress(subprocess.TimeoutExpired):
            second.popen.wait(timeout=60)
        yield first, second
    finally:
        if second is not None:
            second.stop()
        first.stop()
        delete_agent_queues(rabbitmq_url, pool, first.agent_queue)


def test_the_second_agent_exits_with_status_2_and_one_line(
        first_and_second: tuple[Agent, Agent]) -> None:
    _, second = first_and_second
    assert second.popen.returncode == 2, second.log()
    log = second.log()
    assert "Traceback" not in log and "CRITICAL" not in log, log
    lines = [line for line in log.splitlines() if "another agent already runs as" in line]
    assert len(lines) == 1, log
    assert f"{second.agent_id}@" in lines[0] and "agent_id" in lines[0]


def test_the_first_agent_keeps_serving_and_heartbeating(
        first_and_second: tuple[Agent, Agent], rabbitmq_url: str) -> None:
    first, _ = first_and_second
    tap = HeartbeatTap(rabbitmq_url, first.agent_id)
    try:
        beats = tap.wait_for(2, timeout=STOP_TIMEOUT_S)
    finally:
        tap.delete()
    assert first.alive
    assert len({beat.snapshot["boot_id"] for beat in beats}) == 1
    assert len(beats) >= 2
