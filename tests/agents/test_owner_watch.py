"""The owner watch holds the pool queue while the owner rules say no and lets go when
they say yes; a drain and the owner rules hold it apart (either keeps it held)."""

from __future__ import annotations

import threading

from chiffon_worker.agents.intake import DRAIN, OWNER, WorkIntake
from chiffon_worker.agents.owner_rules import OwnerFacts, OwnerRules
from chiffon_worker.worker.owner_watch import OwnerWatch
from tests.waiting import wait_until


class Machine:
    """Facts a test sets, and what the watch told the worker to do."""

    def __init__(self) -> None:
        self.facts = OwnerFacts(idle_seconds=3600.0)
        self.calls: list[str] = []
        self.intake = WorkIntake()
        self.watch = OwnerWatch(OwnerRules(owner_idle_minutes=10), self.intake,
                                lambda: self.facts,
                                stop_consuming=lambda: self.calls.append("stop"),
                                resume_consuming=lambda: self.calls.append("resume"))


def test_the_owner_returning_stops_pool_work_and_leaving_resumes_it() -> None:
    machine = Machine()
    assert machine.watch.check() is None and machine.calls == []
    machine.facts = OwnerFacts(idle_seconds=2.0)
    assert machine.watch.check() == "owner-busy (input 2 s ago)"
    assert machine.intake.snapshot_keys()["accepting"] is False
    assert machine.intake.snapshot_keys()["accepting_reason"] == "owner-busy (input 2 s ago)"
    machine.facts = OwnerFacts(idle_seconds=9.0)
    machine.watch.check()
    assert machine.intake.snapshot_keys()["accepting_reason"] == "owner-busy (input 9 s ago)"
    machine.facts = OwnerFacts(idle_seconds=601.0)
    machine.watch.check()
    assert machine.calls == ["stop", "resume"]
    assert machine.intake.snapshot_keys()["accepting"] is True


def test_a_drained_agent_stays_drained_when_the_owner_leaves() -> None:
    machine = Machine()
    machine.facts = OwnerFacts(idle_seconds=1.0)
    machine.watch.check()
    assert not machine.intake.stop("drained", DRAIN), "already not consuming"
    machine.facts = OwnerFacts(idle_seconds=3600.0)
    machine.watch.check()
    assert machine.calls == ["stop"]
    assert machine.intake.snapshot_keys()["accepting_reason"] == "drained"
    assert machine.intake.resume(DRAIN), "undrained: nothing else holds the queue"


def test_undraining_while_the_owner_is_busy_keeps_the_pool_queue_held() -> None:
    intake = WorkIntake()
    assert intake.stop("drained", DRAIN)
    assert not intake.stop("owner-busy (input 1 s ago)", OWNER)
    assert not intake.resume(DRAIN)
    assert intake.snapshot_keys()["accepting_reason"] == "owner-busy (input 1 s ago)"


def test_the_watch_checks_at_once_and_then_every_interval_until_stopped() -> None:
    machine = Machine()
    machine.facts = OwnerFacts(idle_seconds=1.0)
    stop = threading.Event()
    thread = threading.Thread(target=machine.watch.run, args=(stop, 0.01), daemon=True)
    thread.start()
    wait_until(lambda: machine.calls == ["stop"], 5, "the first check")
    machine.facts = OwnerFacts(idle_seconds=3600.0)
    wait_until(lambda: machine.calls == ["stop", "resume"], 5, "a later check")
    stop.set()
    thread.join(5)
    assert not thread.is_alive()


def test_a_check_whose_facts_fail_is_logged_and_the_watch_goes_on() -> None:
    machine = Machine()
    failures = iter([OSError("input devices gone")])

    def facts() -> OwnerFacts:
        for failure in failures:
            raise failure
        return OwnerFacts(idle_seconds=1.0)

    machine.watch.facts = facts
    stop = threading.Event()
    thread = threading.Thread(target=machine.watch.run, args=(stop, 0.01), daemon=True)
    thread.start()
    wait_until(lambda: machine.calls == ["stop"], 5, "a check after the failed one")
    stop.set()
    thread.join(5)


def test_hand_back_asks_only_the_work_running_now() -> None:
    intake = WorkIntake()
    with intake.running() as first, intake.running() as second:
        assert intake.hand_back() == 2
        assert first.is_set() and second.is_set()
    with intake.running() as later:
        assert not later.is_set()
    assert intake.hand_back() == 0
