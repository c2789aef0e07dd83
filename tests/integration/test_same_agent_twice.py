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
def first_and_second(tmp_path: Path, rabbitmq_url: str
                     ) -> Iterator[tuple[Agent, Agent, HeartbeatTap]]:
    """Two agents with one id on this host, and a tap that saw every heartbeat of that id
    from before the second one started."""
    agent_id, pool = unique("t-twice"), unique("t-pool")
    first = start_agent(tmp_path / "first", rabbitmq_url, agent_id=agent_id, pool=pool)
    second: Agent | None = None
    tap = HeartbeatTap(rabbitmq_url, agent_id)
    try:
        first.wait_ready()
        second = start_agent(tmp_path / "second", rabbitmq_url, agent_id=agent_id, pool=pool)
        with contextlib.suppress(subprocess.TimeoutExpired):
            second.popen.wait(timeout=60)
        yield first, second, tap
    finally:
        if second is not None:
            second.stop()
        first.stop()
        tap.delete()
        delete_agent_queues(rabbitmq_url, pool, first.agent_queue)


def test_the_second_agent_exits_with_status_2_and_one_line(
        first_and_second: tuple[Agent, Agent, HeartbeatTap]) -> None:
    _, second, _ = first_and_second
    assert second.popen.returncode == 2, second.log()
    log = second.log()
    assert "Traceback" not in log and "CRITICAL" not in log, log
    lines = [line for line in log.splitlines() if "another agent already runs as" in line]
    assert len(lines) == 1, log
    assert f"{second.agent_id}@" in lines[0] and "agent_id" in lines[0]


def test_the_second_agent_never_sends_a_heartbeat_and_the_first_keeps_sending(
        first_and_second: tuple[Agent, Agent, HeartbeatTap]) -> None:
    first, _, tap = first_and_second
    seen = len(tap.received)
    beats = tap.wait_for(seen + 2, timeout=STOP_TIMEOUT_S)
    assert first.alive
    assert len({beat.snapshot["boot_id"] for beat in beats}) == 1, "one boot: the first's"
