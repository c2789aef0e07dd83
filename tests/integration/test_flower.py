"""Flower, the operator's live view: a real ``celery -A chiffon_worker flower`` on a free
port sees the agent, its queues, and its heartbeat and execute_work tasks."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import WatchedAgent
from tests.integration.helpers import CELERY, agent_environment, submit, unique
from tests.integration.private_rabbit import free_port, port_open
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 30.0


USER, PASSWORD = "operator", "s3cret-test-only"


def _get(url: str, *, auth: bool = True) -> Any:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=20) as response:
        return json.load(response)


def _poll(url: str, accept: Callable[[Any], bool], timeout: float) -> Any:
    """GET ``url`` until ``accept(json)`` holds, and return that answer; fails after
    ``timeout`` seconds, showing the last answer."""
    last: list[Any] = [None]

    def accepted() -> tuple[Any] | None:  # a tuple: an accepted answer may be empty
        try:
            last[0] = _get(url)
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError) as exc:
            last[0] = exc
            return None
        return (last[0],) if accept(last[0]) else None

    (answer,) = wait_until(accepted, timeout, lambda: f"{url} to answer as expected; "
                           f"last answer: {last[0]!r}", interval=0.1)
    return answer


@pytest.fixture(scope="module")
def flower(rabbit_agent: WatchedAgent, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[str]:
    """Flower's base URL, with basic auth as docs/operations.md deploys it."""
    tmp: Path = tmp_path_factory.mktemp("flower")
    port = free_port()
    env = agent_environment(tmp, {"CHIFFON_BROKER_URL": rabbit_agent.agent.broker_url,
                                  "CHIFFON_AGENT_ID": unique("t-flower")})
    with (tmp / "flower.log").open("wb") as log:
        process = subprocess.Popen(
            [str(CELERY), "-A", "chiffon_worker", "flower", "--address=127.0.0.1",
             f"--port={port}", f"--basic-auth={USER}:{PASSWORD}"],
            env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def flower_log() -> str:
        return (tmp / "flower.log").read_text(errors="replace")

    def listening() -> bool:
        assert process.poll() is None, flower_log()
        return port_open(port)

    try:
        wait_until(listening, START_TIMEOUT_S,
                   lambda: f"Flower on port {port}:\n{flower_log()}")
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_flower_lists_the_agents_worker_with_its_queues(
        flower: str, rabbit_agent: WatchedAgent) -> None:
    agent = rabbit_agent.agent
    workers = _poll(f"{flower}/api/workers?refresh=1",
                    lambda answer: agent.nodename in answer, START_TIMEOUT_S)
    queues = {queue["name"] for queue in workers[agent.nodename]["active_queues"]}
    assert queues == {agent.pool, agent.agent_queue}


def test_flower_shows_heartbeat_and_execute_work_tasks(
        flower: str, rabbit_agent: WatchedAgent) -> None:
    _poll(f"{flower}/api/workers", lambda answer: isinstance(answer, dict), START_TIMEOUT_S)
    submit(rabbit_agent.client, rabbit_agent.agent.pool,
           {"work_id": unique("w"), "work_type": "render", "payload": {}})
    wanted = {"chiffon.heartbeat", "chiffon.execute_work"}
    _poll(f"{flower}/api/tasks",
          lambda answer: wanted <= {task.get("name") for task in answer.values()},
          START_TIMEOUT_S)


def test_flower_api_refuses_requests_without_credentials(flower: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        _get(f"{flower}/api/workers", auth=False)
    assert refused.value.code == 401
