"""Routing work to pools and to the agent with the most headroom."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu import Connection

from chiffon_worker.errors import ChiffonError, RoutingError
from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.orchestrator.routing import Router, pick_agent, work_queue
from chiffon_worker.protocol import WorkRequest, WorkResult

from .feeding import Feeder
from .snapshots import make_snapshot

#: Reset to the start of each test by the autouse ``fresh_now`` fixture (conftest.py).
NOW = time.time()


@pytest.fixture
def three_agents(sqlite_registry: Registry) -> Registry:
    """small: 4 cores, no GPU; mid: 12 GiB card with 6.1 free; big: 24 GiB with 20.5 free,
    busy CPU; plus an offline agent with lots of everything, and one in another pool."""
    feeder = Feeder(sqlite_registry)
    snaps = [
        make_snapshot("small", gpu=False, cores_physical=4, load_1min=0.5,
                      memory_available_gb=12.0, memory_total_gb=15.5),
        make_snapshot("mid", vram_total_gb=11.99, vram_available_gb=6.1, cores_physical=8,
                      load_1min=2.0, memory_available_gb=20.0),
        make_snapshot("big", vram_total_gb=23.99, vram_available_gb=20.5, cores_physical=16,
                      load_1min=14.0, memory_available_gb=50.0, memory_total_gb=62.7),
        make_snapshot("other-pool", pool="gpu_rigs", vram_total_gb=47.99,
                      vram_available_gb=47.0, cores_physical=32, load_1min=0.0),
    ]
    for snap in snaps:
        feeder.snapshot(snap, received_at=NOW)
    feeder.snapshot(make_snapshot("gone", vram_total_gb=47.99, vram_available_gb=47.0,
                                  cores_physical=64, load_1min=0.0), received_at=NOW - 3600)
    feeder.commit()
    return sqlite_registry


@pytest.mark.parametrize(("needs", "chosen"), [
    pytest.param({"gpu_vram_gb": 8}, "big", id="only one GPU has 8 GiB free"),
    pytest.param({"gpu_vram_gb": 4}, "big", id="most free VRAM wins among fits"),
    pytest.param({"cores": 4}, "mid", id="most free cores (big is loaded)"),
    pytest.param({"cores": 3, "gpu_vram_gb": 2}, "mid",
                 id="headroom is the tightest ratio: mid 6/3 vs big 2/3"),
    pytest.param({"memory_gb": 30}, "big", id="memory"),
    pytest.param({"memory_gb": 1}, "big", id="most available memory ratio"),
])
def test_capacity_routing_picks_the_online_agent_with_the_most_headroom(
        three_agents: Registry, needs: dict[str, float], chosen: str) -> None:
    agent = pick_agent(three_agents.agents(), needs, pool="desktop_pool_1", now=NOW + 1)
    assert agent.agent_id == chosen


def test_offline_agents_and_other_pools_are_never_chosen(three_agents: Registry) -> None:
    agent = pick_agent(three_agents.agents(), {"gpu_vram_gb": 1}, now=NOW + 1)
    assert agent.agent_id == "other-pool"  # the offline "gone" has as much, but is offline
    with pytest.raises(RoutingError, match="no online agent in pool nowhere"):
        pick_agent(three_agents.agents(), {"cores": 1}, pool="nowhere", now=NOW + 1)


def test_when_nothing_fits_the_error_names_the_best_candidate(three_agents: Registry) -> None:
    with pytest.raises(RoutingError) as caught:
        pick_agent(three_agents.agents(), {"gpu_vram_gb": 30}, pool="desktop_pool_1",
                   now=NOW + 1)
    assert str(caught.value) == ("no online agent in pool desktop_pool_1 has 30 GiB free "
                                 "VRAM; best has 20.5 GiB free VRAM (big)")


def test_when_every_agent_is_offline_the_error_says_so(three_agents: Registry) -> None:
    with pytest.raises(RoutingError, match=r"no online agent in pool desktop_pool_1 \(4 known, "
                                           r"all offline\)"):
        pick_agent(three_agents.agents(), {"cores": 1}, pool="desktop_pool_1",
                   now=NOW + 3600)


@pytest.mark.parametrize("needs", [{"gpus": 1}, {"cores": -1}, {"cores": "4"},
                                   {"cores": float("nan")}])
def test_unknown_or_invalid_needs_are_routing_errors(three_agents: Registry,
                                                     needs: dict[str, Any]) -> None:
    with pytest.raises(RoutingError):
        pick_agent(three_agents.agents(), needs, now=NOW + 1)


# -- through the real broker -------------------------------------------------------------

@pytest.fixture
def work_queues(rabbitmq_url: str) -> Iterator[list[str]]:
    """Names of work queues a test creates; deleted afterwards."""
    names: list[str] = []
    yield names
    with Connection(rabbitmq_url) as conn:
        for name in names:
            bound = work_queue(name)(conn.default_channel)
            bound.delete()
            bound.exchange.delete()


def _take_one(url: str, queue: str, timeout: float = 10.0) -> Any:
    """Read one message off ``queue`` (acked) with a plain kombu consumer."""
    with Connection(url) as conn:
        simple = conn.SimpleQueue(work_queue(queue))
        try:
            message = simple.get(timeout=timeout)
            message.ack()
            return message
        finally:
            simple.close()


@pytest.mark.integration
def test_a_pool_submit_publishes_execute_work_to_the_pool_queue(
        rabbitmq_url: str, work_queues: list[str]) -> None:
    pool = f"test_pool_{uuid.uuid4().hex[:8]}"
    work_queues.append(pool)
    request = WorkRequest(f"w-{uuid.uuid4()}", "echo", {"text": "hi"})
    with Router(broker_url=rabbitmq_url, result_backend="rpc://") as router:
        submission = router.submit(request, pool=pool)
    assert (submission.queue, submission.agent_id) == (pool, None)
    message = _take_one(rabbitmq_url, pool)
    assert message.headers["task"] == "chiffon.execute_work"
    assert message.headers["id"] == request.work_id
    assert message.content_type == "application/json"
    args, kwargs, _embed = json.loads(message.body)
    assert (args, kwargs) == ([request.to_dict()], {})


@pytest.mark.integration
def test_a_capacity_submit_goes_to_the_chosen_agents_own_queue(
        rabbitmq_url: str, three_agents: Registry, work_queues: list[str]) -> None:
    agent_queue = "chiffon.agent.big"
    work_queues.append(agent_queue)
    request = WorkRequest(f"w-{uuid.uuid4()}", "train", {"epochs": 1})
    with Router(broker_url=rabbitmq_url, result_backend="rpc://",
                registry=three_agents) as router:
        submission = router.submit(request, needs={"gpu_vram_gb": 8}, pool="desktop_pool_1")
        # the 8 GiB just placed on big is held: 20.5 - 8 = 12.5 GiB left to promise
        with pytest.raises(RoutingError, match=r"best has 12.5 GiB free VRAM \(big, 1 "
                                               r"placement\(s\) holding part of it\)"):
            router.submit(WorkRequest(f"w-{uuid.uuid4()}", "train", {}),
                          needs={"gpu_vram_gb": 64}, pool="desktop_pool_1")
    assert (submission.queue, submission.agent_id) == (agent_queue, "big")
    message = _take_one(rabbitmq_url, agent_queue)
    assert json.loads(message.body)[0] == [request.to_dict()]


@pytest.mark.integration
def test_a_submitter_can_wait_for_the_work_result_through_the_rpc_backend(
        rabbitmq_url: str, work_queues: list[str]) -> None:
    pool = f"test_pool_{uuid.uuid4().hex[:8]}"
    work_queues.append(pool)
    worker_app = Celery("test-agent", broker=rabbitmq_url, backend="rpc://",
                        set_as_current=False)
    worker_app.conf.update(task_serializer="json", result_serializer="json",
                           accept_content=["json"], task_queues=[work_queue(pool)],
                           task_default_queue=pool, worker_hijack_root_logger=False,
                           broker_heartbeat=0)  # else the test worker takes 9 s to stop

    @worker_app.task(name="chiffon.execute_work", shared=False)  # not on later apps
    def execute_work(request: dict[str, Any]) -> dict[str, Any]:
        work = WorkRequest.from_json(request)
        return WorkResult.success(work, {"echo": work.payload}, "test-agent", 0.01).to_dict()

    with start_worker(worker_app, pool="solo", perform_ping_check=False,
                      shutdown_timeout=10), \
            Router(broker_url=rabbitmq_url, result_backend="rpc://") as router:
        request = WorkRequest(f"w-{uuid.uuid4()}", "echo", {"n": 42})
        result = router.submit(request, pool=pool).wait(timeout=20)
        assert result == WorkResult(request.work_id, "success", {"echo": {"n": 42}}, None,
                                    "test-agent", 0.01)
        nobody = f"test_pool_{uuid.uuid4().hex[:8]}"
        work_queues.append(nobody)
        with pytest.raises(ChiffonError, match=r"no result for work .* within 0\.3 s"):
            router.submit(WorkRequest("w-x", "echo"), pool=nobody).wait(timeout=0.3)
    worker_app.close()


def test_an_agent_whose_worker_events_stopped_is_never_chosen(three_agents: Registry) -> None:
    # "big" sent a capacity heartbeat at NOW and worker events until NOW + 2, then went
    # silent (killed): 6 s later its capacity heartbeat is fresh, but it is lost
    three_agents.write_signs([{"agent_id": "big", "worker_name": "big@host",
                               "last_event_at": NOW + 2, "event_interval_seconds": 2.0,
                               "offline_at": None}])
    agent = pick_agent(three_agents.agents(), {"gpu_vram_gb": 4}, pool="desktop_pool_1",
                       now=NOW + 8)
    assert agent.agent_id == "mid"


def test_a_stopped_agent_is_never_chosen(three_agents: Registry) -> None:
    three_agents.write_signs([{"agent_id": "big", "worker_name": "big@host",
                               "last_event_at": NOW - 1, "event_interval_seconds": 2.0,
                               "offline_at": NOW}])
    records = {r.agent_id: r for r in three_agents.agents()}
    assert records["big"].liveness(NOW + 1) == "stopped"
    agent = pick_agent(three_agents.agents(), {"gpu_vram_gb": 4}, pool="desktop_pool_1",
                       now=NOW + 1)
    assert agent.agent_id == "mid"


def _pool_of(registry: Registry, *snaps: dict[str, Any]) -> Registry:
    feeder = Feeder(registry)
    for snap in snaps:
        feeder.snapshot(snap, received_at=NOW)
    feeder.commit()
    return registry


def test_an_agent_whose_free_vram_is_unknown_is_never_promised_vram(
        sqlite_registry: Registry) -> None:
    _pool_of(sqlite_registry,
             make_snapshot("intel", vram_total_gb=0.0, vram_available_gb=0.0,
                           gpu_vram_known=False, cores_physical=32, load_1min=0.0),
             make_snapshot("small-card", vram_total_gb=7.99, vram_available_gb=4.0))
    assert pick_agent(sqlite_registry.agents(), {"gpu_vram_gb": 2}, now=NOW + 1).agent_id == \
        "small-card"
    with pytest.raises(RoutingError) as caught:
        pick_agent(sqlite_registry.agents(), {"gpu_vram_gb": 6}, now=NOW + 1)
    assert "best has 4 GiB free VRAM (small-card)" in str(caught.value)


def test_an_agent_whose_free_vram_is_unknown_is_named_as_unknown_when_it_is_the_best(
        sqlite_registry: Registry) -> None:
    _pool_of(sqlite_registry, make_snapshot("intel", vram_total_gb=0.0, vram_available_gb=0.0,
                                            gpu_vram_known=False))
    with pytest.raises(RoutingError) as caught:
        pick_agent(sqlite_registry.agents(), {"gpu_vram_gb": 1}, now=NOW + 1)
    assert str(caught.value).endswith("best has unknown free VRAM (intel)")


def test_an_agent_whose_free_vram_is_unknown_still_takes_work_that_needs_no_vram(
        sqlite_registry: Registry) -> None:
    _pool_of(sqlite_registry, make_snapshot("intel", vram_total_gb=0.0, vram_available_gb=0.0,
                                            gpu_vram_known=False))
    assert pick_agent(sqlite_registry.agents(), {"cores": 1, "gpu_vram_gb": 0},
                      now=NOW + 1).agent_id == "intel"


def test_an_older_agent_that_sent_zero_for_a_null_free_vram_counts_as_unknown(
        sqlite_registry: Registry) -> None:
    older = make_snapshot("old-intel", vram_total_gb=0.0, vram_available_gb=0.0)
    older["gpus"][0].update(vendor="intel", vram_total_gb=None, vram_available_gb=None)
    older["gpu_type"] = "intel"
    _pool_of(sqlite_registry, older)
    record = sqlite_registry.agent("old-intel")
    assert record is not None and record.gpu_vram_known is False


def test_a_drained_agent_is_never_chosen(three_agents: Registry) -> None:
    three_agents.drain("big", "operator@test", now=NOW)
    agent = pick_agent(three_agents.agents(), {"gpu_vram_gb": 4}, pool="desktop_pool_1",
                       now=NOW + 1)
    assert agent.agent_id == "mid"


def test_an_agent_that_says_it_takes_no_work_is_never_chosen(
        sqlite_registry: Registry) -> None:
    _pool_of(sqlite_registry, make_snapshot("busy-owner", accepting=False,
                                            accepting_reason="drained"))
    with pytest.raises(RoutingError, match="1 online but drained or not accepting work"):
        pick_agent(sqlite_registry.agents(), {"cores": 1}, now=NOW + 1)
