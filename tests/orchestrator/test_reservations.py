"""Reservations: a placement holds what it asked for until its work ends or its lifetime
does, so concurrent submitters never over-commit an agent (SQLite and PostgreSQL)."""

from __future__ import annotations

import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from chiffon_worker.errors import RoutingError
from chiffon_worker.orchestrator.registry import Registry, WorkEvent
from chiffon_worker.orchestrator.reservations import (
    HeartbeatTiming,
    Held,
    Reservation,
    held_by_agent,
    promisable,
)
from chiffon_worker.orchestrator.routing import NoFitError, Router
from chiffon_worker.protocol import WorkRequest

from .conftest import RegistryFactory
from .feeding import Feeder
from .snapshots import make_snapshot

#: Reset to the start of each test by the autouse ``fresh_now`` fixture (conftest.py).
NOW = time.time()
CARD_GB = 24.0
ASK_GB = 8.0
PER_CARD = int(CARD_GB // ASK_GB)  # 3 placements of 8 GiB fit a 24 GiB card


def reservation(work_id: str, agent_id: str = "a", *, state: str = "placed",
                needs: dict[str, float] | None = None, started_at: float | None = None,
                expires_at: float = NOW + 3600) -> Reservation:
    return Reservation(work_id=work_id, agent_id=agent_id, pool="p", work_type="train",
                       needs=needs or {"gpu_vram_gb": ASK_GB}, state=state,  # type: ignore[arg-type]
                       placed_at=NOW, expires_at=expires_at, submitter="test",
                       started_at=started_at)


# -- the rules -------------------------------------------------------------------------------


def test_placed_work_is_held_against_both_the_free_and_the_total_figure() -> None:
    held = held_by_agent([reservation("w1")], {"a": HeartbeatTiming(NOW, 30.0)}, NOW)["a"]
    assert (held.promised, held.unreflected, held.count) == (
        {"gpu_vram_gb": ASK_GB}, {"gpu_vram_gb": ASK_GB}, 1)


def test_work_running_for_a_heartbeat_interval_is_in_the_free_figure_already() -> None:
    running = reservation("w1", state="running", started_at=NOW - 31)
    held = held_by_agent([running], {"a": HeartbeatTiming(NOW, 30.0)}, NOW)["a"]
    assert (held.promised, held.unreflected) == ({"gpu_vram_gb": ASK_GB}, {})


def test_work_started_after_the_newest_heartbeat_is_not_reflected_yet() -> None:
    running = reservation("w1", state="running", started_at=NOW - 5)
    held = held_by_agent([running], {"a": HeartbeatTiming(NOW, 30.0)}, NOW)["a"]
    assert held.unreflected == {"gpu_vram_gb": ASK_GB}


@pytest.mark.parametrize("gone", [
    pytest.param(reservation("w1", state="succeeded"), id="ended"),
    pytest.param(reservation("w1", expires_at=NOW - 1), id="past its lifetime"),
])
def test_ended_or_expired_work_holds_nothing(gone: Reservation) -> None:
    assert held_by_agent([gone], {}, NOW) == {}


def test_what_can_be_promised_is_the_smaller_of_free_less_unreflected_and_total_less_promised(
        ) -> None:
    held = Held(promised={"gpu_vram_gb": 16.0}, unreflected={"gpu_vram_gb": 8.0})
    assert promisable(20.0, CARD_GB, held, "gpu_vram_gb") == min(20.0 - 8.0, CARD_GB - 16.0)
    assert promisable(3.0, CARD_GB, held, "gpu_vram_gb") == 0.0  # never negative
    assert promisable(20.0, CARD_GB, None, "gpu_vram_gb") == 20.0


# -- placements on a registry ----------------------------------------------------------------


def two_cards(registry: Registry) -> Registry:
    feeder = Feeder(registry)
    for name in ("card-a", "card-b"):
        feeder.snapshot(make_snapshot(name, vram_total_gb=CARD_GB, vram_available_gb=CARD_GB),
                        received_at=NOW)
    feeder.commit()
    return registry


def router_on(registry: Registry, ttl: float = 3600.0) -> Router:
    return Router(registry=registry, broker_url="memory://", result_backend="rpc://",
                  reservation_ttl_seconds=ttl)


def place(router: Router, work_id: str, now: float = NOW + 1) -> str:
    return router.place(WorkRequest(work_id, "train"), {"gpu_vram_gb": ASK_GB}, None, now)


def test_submits_spread_over_the_agents_with_room_and_then_fail_naming_the_holdings(
        registry: Registry) -> None:
    router = router_on(two_cards(registry))
    chosen = [place(router, f"w{n}") for n in range(2 * PER_CARD)]
    assert sorted(chosen) == ["card-a"] * PER_CARD + ["card-b"] * PER_CARD
    with pytest.raises(NoFitError, match=r"best has 0 GiB free VRAM \(card-a, 3 placement"):
        place(router, "one-too-many")


def test_a_placement_reads_past_the_first_candidates_when_they_are_drained(
        registry: Registry) -> None:
    feeder = Feeder(registry)
    for n in range(12):  # card-00 has the most room, card-11 the least
        feeder.snapshot(make_snapshot(f"card-{n:02d}", vram_total_gb=CARD_GB,
                                      vram_available_gb=CARD_GB - n), received_at=NOW)
    feeder.commit()
    for n in range(10):
        registry.drain(f"card-{n:02d}", "test", now=NOW)
    assert place(router_on(registry), "w1") == "card-10"


def test_work_that_ends_releases_its_reservation(registry: Registry) -> None:
    router = router_on(two_cards(registry))
    for n in range(2 * PER_CARD):
        place(router, f"w{n}")
    assert registry.end_work("w0", "succeeded", NOW + 2)
    assert place(router, "after-w0", NOW + 3) in ("card-a", "card-b")


def test_a_reservation_stops_holding_when_its_lifetime_ends(registry: Registry) -> None:
    router = router_on(two_cards(registry), ttl=60.0)
    for n in range(2 * PER_CARD):
        place(router, f"w{n}", NOW + 1)
    with pytest.raises(NoFitError):
        place(router, "too-early", NOW + 30)
    assert place(router, "after-the-lifetime", NOW + 62) in ("card-a", "card-b")


def test_a_work_id_is_placed_once(registry: Registry) -> None:
    router = router_on(two_cards(registry))
    place(router, "same")
    with pytest.raises(RoutingError, match="work same is already placed"):
        place(router, "same")


def test_task_events_mark_work_running_and_ended(registry: Registry) -> None:
    router = router_on(two_cards(registry))
    agent = place(router, "w1")
    registry.record_work_events([WorkEvent("w1", agent, "running", NOW + 2)])
    (running,) = registry.work()
    assert (running.state, running.started_at) == ("running", NOW + 2)
    registry.record_work_events([WorkEvent("w1", agent, "succeeded", NOW + 3)])
    assert registry.work() == []
    (ended,) = registry.work(ended_since=NOW)
    assert (ended.state, ended.ended_at) == ("succeeded", NOW + 3)


def test_work_seen_only_through_task_events_is_listed_holding_nothing(
        registry: Registry) -> None:
    registry.record_work_events([WorkEvent("pool-work", "card-a", "running", NOW)])
    (seen,) = registry.work()
    assert (seen.work_id, seen.agent_id, seen.state, seen.needs) == (
        "pool-work", "card-a", "running", {})


def test_old_ended_work_is_purged(registry: Registry) -> None:
    router = router_on(two_cards(registry))
    place(router, "w1")
    registry.end_work("w1", "failed", NOW + 2)
    assert registry.purge_work(before=NOW + 3) == 1
    assert registry.work(ended_since=0) == []


# -- many submitters at once ------------------------------------------------------------------

SUBMITS = 50
PROCESSES = 5


def _submit_from_a_process(url: str, schema: str | None, first: int, count: int,
                           now: float) -> list[str | None]:
    """In a child process: ``count`` placements on threads; the agent each got (or None)."""
    registry = Registry(url, schema=schema)
    router = router_on(registry)
    barrier = threading.Barrier(count)

    def one(n: int) -> str | None:
        barrier.wait(timeout=30)
        try:
            return place(router, f"w{first + n}", now)
        except NoFitError:
            return None

    try:
        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(one, range(count)))
    finally:
        registry.close()


def test_fifty_concurrent_submits_from_several_processes_never_over_commit_an_agent(
        registry_factory: RegistryFactory) -> None:
    registry = two_cards(registry_factory())
    per_process = SUBMITS // PROCESSES
    context = multiprocessing.get_context("spawn")
    with context.Pool(PROCESSES) as processes:
        runs: list[Any] = [
            processes.apply_async(_submit_from_a_process, (
                registry_factory.url, registry_factory.schema, n * per_process,
                per_process, NOW + 1))
            for n in range(PROCESSES)]
        chosen = [agent for run in runs for agent in run.get(timeout=120)]
    placed = [agent for agent in chosen if agent is not None]
    assert sorted(placed) == ["card-a"] * PER_CARD + ["card-b"] * PER_CARD
    held = [r.agent_id for r in registry.work()]
    assert sorted(held) == sorted(placed), "exactly the placements that succeeded are held"


def test_a_submit_told_to_wait_for_room_gets_it_when_work_ends(registry: Registry) -> None:
    router = router_on(two_cards(registry))
    for n in range(2 * PER_CARD):
        place(router, f"w{n}", time.time())
    ender = threading.Timer(0.5, registry.end_work, ("w0", "succeeded", time.time()))
    ender.start()
    try:
        started = time.monotonic()
        submission = router.submit(WorkRequest("patient", "train"),
                                   needs={"gpu_vram_gb": ASK_GB}, wait_for_room_seconds=20)
    finally:
        ender.join()
        router.close()
    assert submission.agent_id in ("card-a", "card-b")
    assert time.monotonic() - started < 20


def test_a_submit_that_waits_for_room_in_vain_fails_naming_the_best_candidate(
        registry: Registry) -> None:
    router = router_on(two_cards(registry))
    for n in range(2 * PER_CARD):
        place(router, f"w{n}", time.time())
    with pytest.raises(NoFitError, match="no online agent has 8 GiB free VRAM"):
        router.submit(WorkRequest("in-vain", "train"), needs={"gpu_vram_gb": ASK_GB},
                      wait_for_room_seconds=0.3)
    router.close()
