"""Several orchestrators writing one registry: each batch is sequenced in the registry's
ingest turn, so the books come out as with one orchestrator, whatever order the
heartbeats of an agent reach them in.

Two consumers are simulated in one process: a judge and a writer each, on one registry
(SQLite and PostgreSQL), committing in turns as the consumer does.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import text

from chiffon_worker.errors import RegistryError
from chiffon_worker.orchestrator import registry as registry_module
from chiffon_worker.orchestrator.batch_writer import BatchWriter
from chiffon_worker.orchestrator.ingest_counters import IngestStats
from chiffon_worker.orchestrator.judge import LATE, LATE_COLUMNS, Checked, HeartbeatJudge
from chiffon_worker.orchestrator.registry import Registry
from tests.waiting import wait_until

from .conftest import RegistryFactory
from .snapshots import make_snapshot

NOW = time.time()


class Orchestrator:
    """One consumer's judge and writer on ``registry`` (nothing seeded: it learns the
    agents from the registry in its turns, as ``chiffon orchestrator`` does)."""

    def __init__(self, registry: Registry, name: str) -> None:
        self.stats = IngestStats()
        self.judge = HeartbeatJudge((), history_points=registry.history_points,
                                    stats=self.stats)
        self.writer = BatchWriter(registry, stats=self.stats, name=name)

    def batch(self, *seqs: int, agent: str = "a1", redelivered: bool = False) -> None:
        """Check heartbeats ``seqs`` of ``agent`` and commit them as one batch."""
        held = []
        for seq in seqs:
            checked = self.judge.check_snapshot(
                make_snapshot(agent, seq=seq, collected_at=NOW + seq),
                received_at=NOW + seq, redelivered=redelivered)
            assert isinstance(checked, Checked), checked
            held.append(checked)
        self.writer.commit(held, self.judge)


def books(registry: Registry, agent: str = "a1") -> tuple[int, int, int, int, int]:
    """(seq, restarts, missed, history_count, history points) of ``agent``."""
    record = registry.agent(agent, with_snapshot=False)
    assert record is not None
    return (record.seq, record.restarts, record.missed, record.history_count,
            len(registry.history(agent)))


def test_two_orchestrators_taking_turns_keep_one_agents_books_as_one_would(
        registry_factory: RegistryFactory) -> None:
    registry = registry_factory()
    first, second = Orchestrator(registry, "first"), Orchestrator(registry, "second")
    first.batch(1, 2)
    second.batch(3)  # learns seq 2 from the registry: no gap, no restart
    first.batch(4)  # its memory says 2: it reloads, seq 3 is known
    assert books(registry) == (4, 0, 0, 4, 4)


def test_a_heartbeat_overtaken_by_a_newer_one_fills_its_gap(
        registry_factory: RegistryFactory) -> None:
    registry = registry_factory()
    first, second = Orchestrator(registry, "first"), Orchestrator(registry, "second")
    first.batch(1)
    second.batch(3)  # seq 2 is still with the first orchestrator
    assert books(registry)[2] == 1
    first.batch(2)
    assert books(registry) == (3, 0, 0, 3, 3)
    assert first.stats.late == 1
    record = registry.agent("a1")
    assert record is not None and record.snapshot["seq"] == 3, "the newer snapshot stays"
    assert [p.received_at for p in registry.history("a1")] == [NOW + 1, NOW + 2, NOW + 3]


def test_a_redelivered_heartbeat_of_a_dead_orchestrator_fills_its_gap_once(
        registry_factory: RegistryFactory) -> None:
    registry = registry_factory()
    survivor = Orchestrator(registry, "survivor")
    survivor.batch(1, 3)  # seq 2 was taken by an orchestrator that died unacked
    survivor.batch(2, redelivered=True)
    survivor.batch(2, redelivered=True)  # and again: now a duplicate
    assert books(registry) == (3, 0, 0, 3, 3)
    assert survivor.stats.ignored["redelivered"] == 1


def test_a_late_heartbeat_and_a_newer_one_in_one_batch_leave_the_newest_row(
        registry_factory: RegistryFactory) -> None:
    registry = registry_factory()
    first, second = Orchestrator(registry, "first"), Orchestrator(registry, "second")
    first.batch(1)
    second.batch(3)
    first.batch(2, 4)
    assert books(registry) == (4, 0, 0, 4, 4)


def test_a_restart_forgets_the_old_process_gaps() -> None:
    judge = HeartbeatJudge((), history_points=10)
    judge.judge_snapshot(make_snapshot("a1", seq=1), received_at=NOW)
    gap = judge.judge_snapshot(make_snapshot("a1", seq=3), received_at=NOW + 1)
    restart = judge.judge_snapshot(make_snapshot("a1", boot_id="b2", seq=1),
                                   received_at=NOW + 2)
    assert gap.rows is not None and gap.rows.agent["missed_seqs"] == "[2]"
    assert restart.rows is not None and restart.rows.agent["missed_seqs"] == "[]"
    assert restart.rows.agent["missed"] == 1, "what was missed stays missed"


def test_the_judge_remembers_a_bounded_number_of_missed_seqs() -> None:
    judge = HeartbeatJudge((), history_points=10)
    judge.judge_snapshot(make_snapshot("a1", seq=1), received_at=NOW)
    outcome = judge.judge_snapshot(make_snapshot("a1", seq=1000), received_at=NOW + 1)
    assert outcome.rows is not None and outcome.rows.agent["missed"] == 998
    late = judge.judge_snapshot(make_snapshot("a1", seq=999), received_at=NOW + 2)
    lost = judge.judge_snapshot(make_snapshot("a1", seq=2), received_at=NOW + 3)
    assert (late.reason, lost.reason) == (LATE, "out_of_order")


def test_a_failed_turn_stores_nothing_counts_nothing_and_the_retry_does_it_all(
        registry_factory: RegistryFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = registry_factory()
    one = Orchestrator(registry, "one")
    one.batch(1)
    checked = [one.judge.check_snapshot(make_snapshot("a1", seq=seq), received_at=NOW + seq)
               for seq in (2, 4)]
    held = [c for c in checked if isinstance(c, Checked)]

    def fail(*_args: Any, **_kwargs: Any) -> None:
        raise RegistryError("cannot write registry: disk is full")

    with monkeypatch.context() as patch:
        patch.setattr(registry, "_write_rows", fail)
        with pytest.raises(RegistryError):
            one.writer.commit(held, one.judge)
    assert (one.stats.accepted, one.stats.missed, one.stats.write_errors) == (1, 0, 1)
    assert books(registry) == (1, 0, 0, 1, 1)
    one.writer.commit(held, one.judge)
    assert books(registry) == (4, 0, 1, 3, 3)
    assert (one.stats.accepted, one.stats.missed) == (3, 1)


def test_forgetting_an_agent_makes_every_orchestrator_forget_it(
        registry_factory: RegistryFactory) -> None:
    registry = registry_factory()
    one = Orchestrator(registry, "one")
    one.batch(1, 2)
    assert registry.forget("a1")
    one.batch(3)
    record = registry.agent("a1", with_snapshot=False)
    assert record is not None
    assert (record.first_seen, record.history_count, record.missed) == (NOW + 3, 1, 0)


def test_the_judge_and_the_registry_agree_on_what_a_late_heartbeat_writes() -> None:
    assert LATE_COLUMNS == registry_module._LATE_COLUMNS


def test_an_agents_first_heartbeat_overtaken_by_its_second_is_late_not_lost(
        registry_factory: RegistryFactory) -> None:
    registry = registry_factory()
    first, second = Orchestrator(registry, "first"), Orchestrator(registry, "second")
    second.batch(2)  # a backlog drained by two: seq 1 is still with the first
    first.batch(1)
    assert books(registry) == (2, 0, 0, 2, 2)
    assert first.stats.late == 1


def test_an_agent_first_seen_well_into_its_life_awaits_no_earlier_heartbeat(
        registry_factory: RegistryFactory) -> None:
    registry = registry_factory()
    one = Orchestrator(registry, "one")
    one.batch(500)  # a new registry, an agent running for hours
    one.batch(499)
    assert books(registry) == (500, 0, 0, 1, 1)
    record = registry.agent("a1", with_snapshot=False)
    assert record is not None and record.missed_seqs == ()


def test_two_writers_taking_the_first_turn_at_once_each_see_the_other(
        on_postgresql: RegistryFactory) -> None:
    first, second = on_postgresql(), on_postgresql()
    generations: dict[str, int] = {}
    holding = threading.Event()
    release = threading.Event()

    def take(registry: Registry, name: str) -> None:
        with registry.ingest_turn(name) as turn:
            generations[name] = turn.generation
            if name == "first":
                holding.set()
                release.wait(30)

    threads = [threading.Thread(target=take, args=(first, "first"))]
    threads[0].start()
    holding.wait(30)
    threads.append(threading.Thread(target=take, args=(second, "second")))
    threads[1].start()
    with first.engine.connect() as conn:  # the second waits on the turn's row lock
        wait_until(lambda: conn.execute(text(
            "SELECT count(*) FROM pg_locks WHERE NOT granted")).scalar(), 30,
            "the second writer to wait for the turn")
    release.set()
    for thread in threads:
        thread.join(30)
    with first.ingest_turn("first") as turn:
        assert turn.generation != generations["first"] + 1, "the second wrote in between"
    assert sorted(generations.values()) == [1, 2]
