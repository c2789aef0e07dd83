"""The lead among orchestrators on one registry: one holder at a time on PostgreSQL (the
others wait), one orchestrator per file on SQLite."""

from __future__ import annotations

import threading

import pytest

from chiffon_worker.orchestrator.leadership import Leadership, RegistryInUse
from chiffon_worker.wire import HEARTBEAT_QUEUE

from .conftest import RegistryFactory


def test_on_postgresql_a_second_orchestrator_waits_until_the_first_gives_the_lead_up(
        on_postgresql: RegistryFactory) -> None:
    registry_factory = on_postgresql
    first = Leadership(registry_factory(), HEARTBEAT_QUEUE, poll_seconds=0.05)
    second = Leadership(registry_factory(), HEARTBEAT_QUEUE, poll_seconds=0.05)
    stop = threading.Event()
    assert first.acquire(stop)
    taken = threading.Event()
    waiter = threading.Thread(target=lambda: second.acquire(stop) and taken.set())
    waiter.start()
    assert not taken.wait(0.5), "the lead is held: the second stands by"
    first.release()
    assert taken.wait(10), "the second takes over once the first gives the lead up"
    waiter.join(5)
    assert second.holds()
    second.release()


def test_a_standby_told_to_stop_gives_up_waiting(on_postgresql: RegistryFactory) -> None:
    registry_factory = on_postgresql
    first = Leadership(registry_factory(), HEARTBEAT_QUEUE, poll_seconds=0.05)
    assert first.acquire(threading.Event())
    stop = threading.Event()
    stop.set()
    assert Leadership(registry_factory(), HEARTBEAT_QUEUE).acquire(stop) is False
    first.release()


def test_different_queues_lead_apart(on_postgresql: RegistryFactory) -> None:
    registry_factory = on_postgresql
    stop = threading.Event()
    main = Leadership(registry_factory(), HEARTBEAT_QUEUE)
    copy = Leadership(registry_factory(), "chiffon.heartbeats.copy.x")
    assert main.acquire(stop) and copy.acquire(stop)
    main.release()
    copy.release()


def test_on_sqlite_a_second_orchestrator_on_the_file_is_refused_naming_it(
        on_sqlite: RegistryFactory) -> None:
    registry_factory = on_sqlite
    first = Leadership(registry_factory(), HEARTBEAT_QUEUE)
    assert first.acquire(threading.Event())
    second = registry_factory()
    with pytest.raises(RegistryInUse, match=r"registry .*reg\.sqlite3 is in use by another "
                                            r"chiffon orchestrator"):
        Leadership(second, HEARTBEAT_QUEUE).acquire(threading.Event())
    first.release()
    assert Leadership(second, HEARTBEAT_QUEUE).acquire(threading.Event()), \
        "free again once the first is gone"
