"""The public names of ../shared/DESIGN.md, used exactly as written there, keep working."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from chiffon_worker.agents.base import BaseAgent
from chiffon_worker.agents.desktop import DesktopAgent
from chiffon_worker.config import Config
from chiffon_worker.protocol import SNAPSHOT_KEYS, WorkRequest, WorkResult
from chiffon_worker.wire import EXECUTE_WORK_TASK, HEARTBEAT_TASK


@pytest.fixture
def agent(clean_env: Path) -> Iterator[DesktopAgent]:
    made = DesktopAgent('test-agent', 'desktop', Config())
    yield made
    made.close()


def test_desktop_agent_is_a_base_agent(agent: DesktopAgent) -> None:
    assert isinstance(agent, BaseAgent)
    assert (agent.agent_id, agent.agent_type) == ("test-agent", "desktop")


def test_resource_and_gpu_metrics_are_dicts_of_snapshot_keys(agent: DesktopAgent) -> None:
    resources = agent._get_resource_metrics()
    gpu = agent._get_gpu_metrics()
    assert isinstance(resources, dict) and isinstance(gpu, dict)
    assert set(gpu) <= set(resources)
    assert {"cpu_cores_available", "memory_available_gb", "gpu_vram_available_gb"} <= set(
        resources) & set(SNAPSHOT_KEYS)


def test_capabilities_are_a_dict(agent: DesktopAgent) -> None:
    assert isinstance(agent.get_agent_capabilities(), dict)


def test_execute_work_returns_a_work_result_with_the_public_json_keys(
        agent: DesktopAgent) -> None:
    result = agent.execute_work(WorkRequest("w-1", "render", {"frame": 1}))
    assert isinstance(result, WorkResult)
    assert set(result.to_dict()) == {"work_id", "status", "output", "error", "agent_id",
                                     "duration_seconds"}
    assert (result.work_id, result.status) == ("w-1", "success")


def test_task_names_are_the_public_ones() -> None:
    assert (HEARTBEAT_TASK, EXECUTE_WORK_TASK) == ("chiffon.heartbeat", "chiffon.execute_work")


def test_the_agent_app_registers_execute_work_under_its_public_name(clean_env: Path) -> None:
    from chiffon_worker.worker import runtime
    from chiffon_worker.worker.factory import ChiffonCelery
    from chiffon_worker.worker.settings import celery_settings
    from chiffon_worker.worker.tasks import register_tasks

    app = ChiffonCelery("public-names-test", set_as_current=False)
    app.config_from_object(celery_settings(runtime.load_config_or_exit()))
    register_tasks(app)
    assert "chiffon.execute_work" in app.tasks
    app.close()
