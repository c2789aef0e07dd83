"""The worker-event listener's bookkeeping: which events count, for which agent, and what
it writes (the broker side is covered end to end in tests/faults/test_liveness_in_seconds.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from chiffon_worker.orchestrator.registry import Registry
from chiffon_worker.orchestrator.worker_events import WorkerEventListener, agent_id_of

from .feeding import Feeder
from .snapshots import make_snapshot

T0 = 1_764_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry() -> Iterator[Registry]:
    with Registry("sqlite://") as made:
        feeder = Feeder(made)
        feeder.snapshot(make_snapshot("desk-1"), received_at=T0)
        feeder.commit()
        yield made


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def listener(registry: Registry, clock: Clock) -> WorkerEventListener:
    return WorkerEventListener("memory://", registry, clock=clock)


def _event(kind: str, name: str = "desk-1@host-a", freq: object = 2.0) -> dict[str, object]:
    return {"type": kind, "hostname": name, "freq": freq, "timestamp": 0.0}


def _signs(registry: Registry, agent_id: str = "desk-1") -> object:
    record = registry.agent(agent_id, with_snapshot=False)
    assert record is not None
    return record.signs


def test_the_agent_id_is_the_worker_name_before_the_at() -> None:
    assert agent_id_of("3f2a-uuid@rig.lab") == "3f2a-uuid"


def test_a_worker_heartbeat_is_written_with_its_receipt_time_and_interval(
        listener: WorkerEventListener, registry: Registry, clock: Clock) -> None:
    clock.now = T0 + 5
    listener.record_event(_event("worker-heartbeat", freq=2.0))
    listener.flush()
    signs = _signs(registry)
    assert signs is not None
    assert (signs.worker_name, signs.last_event_at, signs.event_interval_seconds,
            signs.offline_at) == ("desk-1@host-a", T0 + 5, 2.0, None)


def test_worker_offline_marks_the_clean_stop_and_keeps_the_last_alive_event(
        listener: WorkerEventListener, registry: Registry, clock: Clock) -> None:
    clock.now = T0 + 5
    listener.record_event(_event("worker-heartbeat"))
    clock.now = T0 + 6
    listener.record_event(_event("worker-offline"))
    listener.flush()
    signs = _signs(registry)
    assert signs is not None and (signs.last_event_at, signs.offline_at) == (T0 + 5, T0 + 6)
    record = registry.agent("desk-1", with_snapshot=False)
    assert record is not None and record.liveness(T0 + 7) == "stopped"


def test_workers_that_are_not_agents_in_the_registry_are_not_written(
        listener: WorkerEventListener, registry: Registry) -> None:
    listener.record_event(_event("worker-heartbeat", name="celery@some-other-app"))
    listener.flush()
    with registry.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT agent_id FROM chiffon_signs_of_life").all()
    assert rows == []


@pytest.mark.parametrize("body", [
    pytest.param(["not", "a", "dict"], id="not an object"),
    pytest.param({"type": "worker-heartbeat"}, id="no hostname"),
    pytest.param({"type": "worker-heartbeat", "hostname": "no-at-sign"}, id="not a node name"),
    pytest.param({"type": "task-succeeded", "hostname": "desk-1@host-a"}, id="a task event"),
    pytest.param({"type": 7, "hostname": "desk-1@host-a"}, id="type not text"),
])
def test_events_that_are_not_worker_events_are_ignored(
        listener: WorkerEventListener, registry: Registry, body: object) -> None:
    listener.record_event(body)
    listener.flush()
    assert _signs(registry) is None


@pytest.mark.parametrize("freq", [None, True, -1, 0, "2", 10_000])
def test_an_unusable_event_interval_falls_back_to_celerys_default(
        listener: WorkerEventListener, registry: Registry, freq: object) -> None:
    listener.record_event(_event("worker-heartbeat", freq=freq))
    listener.flush()
    signs = _signs(registry)
    assert signs is not None and signs.event_interval_seconds == 2.0


def test_task_events_a_worker_buffers_into_one_message_are_each_recorded(
        sqlite_registry: Registry) -> None:
    listener = WorkerEventListener("memory://", sqlite_registry, clock=lambda: 1000.0)
    listener.record_event([
        {"type": "task-received", "hostname": "a1@h", "uuid": "w1",
         "name": "chiffon.execute_work"},
        {"type": "task-started", "hostname": "a1@h", "uuid": "w1"},
    ])
    listener.flush()
    (work,) = sqlite_registry.work()
    assert (work.work_id, work.agent_id, work.state, work.started_at) == (
        "w1", "a1", "running", 1000.0)
