"""``chiffon.execute_work`` through RabbitMQ and Celery's classic in-process test worker,
configured with the agent's own settings: the request formats it takes and the error
results it returns instead of raising."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from chiffon_worker.agents.desktop import STUB_OUTPUT
from chiffon_worker.config import Config
from chiffon_worker.protocol import WorkResult
from chiffon_worker.wire import EXECUTE_WORK_TASK
from chiffon_worker.worker import runtime
from chiffon_worker.worker.settings import celery_settings
from chiffon_worker.worker.tasks import register_tasks
from tests.integration.helpers import close_client, delete_agent_queues, unique

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def celery_worker_pool() -> str:
    """The agent's default pool (the fixture's default, solo, is not what agents run)."""
    return "threads"


@pytest.fixture
def agent_config(rabbitmq_url: str, clean_env: Path,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[Config]:
    config = Config(broker_url=rabbitmq_url, agent_id=unique("t-inproc"),
                    agent_pool_name=unique("t-pool"))
    runtime.set_config(config)  # what the task's get_config() returns
    yield config
    runtime.reset()


@pytest.fixture
def celery_config(agent_config: Config) -> dict[str, Any]:
    settings = celery_settings(agent_config)
    # the in-process worker's loop notices the end of a test at its next wake-up, which
    # AMQP heartbeats stretch to ~3 s; without them teardown takes ~1 s
    settings["broker_heartbeat"] = 0
    return settings


@pytest.fixture
def chiffon_app(celery_app: Celery, agent_config: Config) -> Iterator[Celery]:
    """The test app with the agent's tasks (registered before the worker starts)."""
    register_tasks(celery_app)
    yield celery_app
    close_client(celery_app)
    delete_agent_queues(agent_config.effective_broker_url, agent_config.pool_queue,
                        agent_config.agent_queue)


def _run(app: Celery, request: Any) -> WorkResult:
    pool = app.conf.task_default_queue
    return WorkResult.from_json(app.send_task(EXECUTE_WORK_TASK, args=[request],
                                              queue=pool).get(timeout=10))


def test_execute_work_accepts_the_request_as_json_text(
        chiffon_app: Celery, celery_worker: Any) -> None:
    result = _run(chiffon_app, '{"work_id": "w1", "work_type": "render", "payload": {}}')
    assert (result.work_id, result.status, result.output) == ("w1", "success", STUB_OUTPUT)


def test_unknown_request_field_returns_an_error_result_naming_it(
        chiffon_app: Celery, celery_worker: Any) -> None:
    result = _run(chiffon_app, {"work_id": "w2", "work_type": "render", "priority": 9})
    assert (result.work_id, result.status) == ("w2", "error")
    assert "priority" in (result.error or "")


def test_sleep_work_with_a_bad_payload_returns_an_error_result(
        chiffon_app: Celery, celery_worker: Any) -> None:
    result = _run(chiffon_app, {"work_id": "w3", "work_type": "sleep",
                                "payload": {"seconds": 1e9}})
    assert result.status == "error" and "payload.seconds" in (result.error or "")


def test_sleep_work_holds_the_slot_and_reports_what_it_slept(
        chiffon_app: Celery, celery_worker: Any) -> None:
    result = _run(chiffon_app, {"work_id": "w4", "work_type": "sleep",
                                "payload": {"seconds": 0.2}})
    assert (result.status, result.output) == ("success", {"slept_seconds": 0.2})
    assert result.duration_seconds >= 0.2
