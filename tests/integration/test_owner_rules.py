"""The owner rules end to end: two real agents of one pool on a private RabbitMQ vhost; one
of them is a desktop whose owner comes and goes (``owner_idle_minutes``), the other has no
rules.

The owner's input is replayed as the access time of ``<dev_root>/input/event0`` (logind
is out of reach: ``DBUS_SYSTEM_BUS_ADDRESS`` names no bus), as HTCondor reads it. While
the owner is at the keyboard the desktop stops consuming the pool queue within one check
(its own queue keeps its consumer), says ``accepting: false`` with ``owner-busy (input
... ago)``, and pool work goes to the other agent; once the owner has left, it consumes
again by itself.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from chiffon_worker.wire import EXECUTE_WORK_TASK, agent_queue_name, declared_queue
from tests.integration.helpers import (
    Agent,
    HeartbeatTap,
    close_client,
    delete_agent_queues,
    queue_consumers,
    start_agent,
    unique,
    work_client,
)
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SOON_S = 20.0
CHECK_S = 0.2



def input_device(tmp_path: Path, *, present: bool) -> Path:
    """A replayed ``<tmp_path>/dev/input/event0`` with the owner ``present`` or not."""
    device = tmp_path / "dev" / "input" / "event0"
    device.parent.mkdir(parents=True)
    device.touch()
    owner_at_keyboard(device, present)
    return device


def owner_rules_env(tmp_path: Path, **more: str) -> dict[str, str]:
    """An agent's environment: idle 30 s required, checked every CHECK_S, input read under
    ``<tmp_path>/dev``, no system bus (so no logind)."""
    return {"CHIFFON_OWNER_IDLE_MINUTES": "0.5", "CHIFFON_OWNER_CHECK_SECONDS": f"{CHECK_S}",
            "CHIFFON_DEV_ROOT": str(tmp_path / "dev"),
            "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path / 'no-bus'}", **more}


def owner_at_keyboard(device: Path, present: bool) -> None:
    """The owner's newest input: an hour from now (present: idle 0 for the whole test)
    or an hour ago (gone)."""
    when = time.time() + (3600 if present else -3600)
    os.utime(device, (when, when))


def test_the_owner_at_the_keyboard_sends_pool_work_elsewhere_until_they_leave(
        vhost: str, tmp_path: Path) -> None:
    device = input_device(tmp_path, present=True)
    pool = unique("t-pool")
    desktop_id = unique("t-desktop")
    agents: list[Agent] = []
    tap = HeartbeatTap(vhost, desktop_id)
    client = work_client(vhost, "rpc://")
    try:
        agents.append(start_agent(tmp_path, vhost, agent_id=desktop_id, pool=pool,
                                  extra_env=owner_rules_env(tmp_path)))
        agents.append(start_agent(tmp_path, vhost, pool=pool))
        for agent in agents:
            agent.wait_ready()
        wait_until(lambda: queue_consumers(vhost, pool) == 1, SOON_S,
                   "only the agent without rules on the pool queue")
        assert queue_consumers(vhost, agent_queue_name(desktop_id)) == 1
        busy = tap.wait_until(lambda s: s.get("accepting") is False, SOON_S)
        assert busy is not None, "no heartbeat said accepting: false"
        assert busy.snapshot["accepting_reason"].startswith("owner-busy (input ")
        assert (busy.snapshot["owner_idle_seconds"], busy.snapshot["owner_idle_source"]) == (
            0.0, "input")

        request = {"work_id": unique("w"), "work_type": "echo", "payload": {}}
        result = client.send_task(EXECUTE_WORK_TASK, args=[request],
                                  queue=declared_queue(pool))
        assert result.get(timeout=SOON_S)["agent_id"] == agents[1].agent_id

        owner_at_keyboard(device, present=False)
        wait_until(lambda: queue_consumers(vhost, pool) == 2, SOON_S,
                   "the desktop back on the pool queue")
        back = tap.wait_until(lambda s: s.get("accepting") is True, SOON_S)
        assert back is not None and back.snapshot["accepting_reason"] is None
        assert back.snapshot["owner_idle_seconds"] >= 3600
    finally:
        close_client(client)
        tap.close()
        for agent in agents:
            agent.stop()
            delete_agent_queues(vhost, agent.pool, agent.agent_queue)


def test_with_requeue_the_owners_return_hands_running_work_to_another_agent_once(
        vhost: str, tmp_path: Path) -> None:
    device = input_device(tmp_path, present=False)
    pool = unique("t-pool")
    agents: list[Agent] = []
    client = work_client(vhost, "rpc://")
    try:
        desktop = start_agent(tmp_path, vhost, pool=pool, extra_env=owner_rules_env(
            tmp_path, CHIFFON_OWNER_RETURNS="requeue"))
        agents.append(desktop)
        desktop.wait_ready()
        work_id = unique("w")
        request = {"work_id": work_id, "work_type": "sleep", "payload": {"seconds": 6}}
        result = client.send_task(EXECUTE_WORK_TASK, args=[request], task_id=work_id,
                                  queue=declared_queue(pool))
        wait_until(lambda: f"work {work_id}: sleeping" in desktop.log(), SOON_S,
                   "the desktop running the work")
        other = start_agent(tmp_path, vhost, pool=pool)
        agents.append(other)
        other.wait_ready()
        owner_at_keyboard(device, present=True)
        assert result.get(timeout=SOON_S)["agent_id"] == other.agent_id
        assert f"work {work_id} handed back to the pool queue" in desktop.log()
        assert [agent.log().count(f"work {work_id}: sleeping") for agent in agents] == [1, 1]
    finally:
        close_client(client)
        for agent in agents:
            agent.stop()
            delete_agent_queues(vhost, agent.pool, agent.agent_queue)
