"""The agent's Celery settings come from the chiffon config alone.

A ``celeryconfig.py`` in the directory the agent starts from (a different broker, queue
``celery``, prefork, events off) or ``CELERY_CONFIG_MODULE`` in its environment must not
take the agent over: it is ignored with one warning, the agent consumes its own queues on
the configured broker, heartbeats flow, and the ready line says so truthfully.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import (
    CELERY,
    READY_TIMEOUT_S,
    STOP_TIMEOUT_S,
    TEST_HEARTBEAT_TIMEOUT_S,
    HeartbeatTap,
    agent_environment,
    delete_agent_queues,
    unique,
)

pytestmark = pytest.mark.integration

STRAY_SETTINGS = """\
broker_url = "redis://127.0.0.1:6379/9"
task_default_queue = "celery"
worker_pool = "prefork"
worker_send_task_events = False
beat_schedule_filename = "stray-schedule"
"""


class StartedAgent:
    """An agent started from ``cwd`` whose output goes to ``log_path``."""

    def __init__(self, popen: subprocess.Popen[bytes], log_path: Path, agent_id: str,
                 pool: str) -> None:
        self.popen, self.log_path, self.agent_id, self.pool = popen, log_path, agent_id, pool

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = READY_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.popen.poll() is None:
            if re.search(pattern, self.log(), re.MULTILINE):
                return self.log()
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not in the agent's log:\n{self.log()}")


@pytest.fixture
def agent_from_a_directory_with_stray_settings(
        tmp_path: Path, rabbitmq_url: str) -> Iterator[tuple[StartedAgent, HeartbeatTap, Path]]:
    agent_id, pool = unique("t-stray"), unique("t-pool")
    cwd = tmp_path / "project"
    cwd.mkdir()
    (cwd / "celeryconfig.py").write_text(STRAY_SETTINGS, encoding="utf-8")
    (tmp_path / "home").mkdir()
    env = agent_environment(tmp_path / "home", {
        "CHIFFON_BROKER_URL": rabbitmq_url, "CHIFFON_AGENT_ID": agent_id,
        "CHIFFON_AGENT_POOL_NAME": pool, "CHIFFON_HEARTBEAT_INTERVAL": "1",
        "CHIFFON_HEARTBEAT_TIMEOUT_SECONDS": str(TEST_HEARTBEAT_TIMEOUT_S),
        "CELERY_CONFIG_MODULE": "celeryconfig",
    })
    tap = HeartbeatTap(rabbitmq_url, agent_id)
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen([str(CELERY), "-A", "chiffon_worker", "worker", "-B"],
                                 env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    agent = StartedAgent(popen, log_path, agent_id, pool)
    try:
        yield agent, tap, cwd
    finally:
        popen.terminate()
        try:
            popen.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(STOP_TIMEOUT_S)
        tap.delete()
        delete_agent_queues(rabbitmq_url, pool, f"chiffon.agent.{agent_id}")


def test_a_stray_celeryconfig_is_ignored_with_one_warning_each(
        agent_from_a_directory_with_stray_settings: tuple[StartedAgent, HeartbeatTap, Path],
) -> None:
    agent, _, cwd = agent_from_a_directory_with_stray_settings
    text = agent.wait_for_log(r" ready\.$")
    assert text.count(f"ignoring {cwd / 'celeryconfig.py'}: ") == 1
    assert text.count("ignoring CELERY_CONFIG_MODULE=celeryconfig: ") == 1


def test_the_agent_still_heartbeats_on_the_configured_broker(
        agent_from_a_directory_with_stray_settings: tuple[StartedAgent, HeartbeatTap, Path],
) -> None:
    agent, tap, _ = agent_from_a_directory_with_stray_settings
    beats = tap.wait_for(2, timeout=READY_TIMEOUT_S)
    assert [beat.snapshot["seq"] for beat in beats[:2]] == [1, 2], agent.log()


def test_the_ready_line_names_the_configured_broker_and_the_agents_own_queues(
        agent_from_a_directory_with_stray_settings: tuple[StartedAgent, HeartbeatTap, Path],
) -> None:
    agent, _, _ = agent_from_a_directory_with_stray_settings
    text = agent.wait_for_log(r"chiffon agent .* ready: ")
    line = next(row for row in text.splitlines() if "chiffon agent " in row and " ready: " in row)
    queues = sorted([agent.pool, f"chiffon.agent.{agent.agent_id}"])
    assert f"consuming {', '.join(queues)}, broker amqp://guest:**@127.0.0.1:5672//" in line
    assert "redis" not in line and "celery," not in line


def test_nothing_is_written_into_the_directory_the_agent_started_from(
        agent_from_a_directory_with_stray_settings: tuple[StartedAgent, HeartbeatTap, Path],
) -> None:
    agent, tap, cwd = agent_from_a_directory_with_stray_settings
    tap.wait_for(2, timeout=READY_TIMEOUT_S)
    assert sorted(p.name for p in cwd.iterdir() if p.name != "__pycache__") == [
        "celeryconfig.py"], agent.log()
