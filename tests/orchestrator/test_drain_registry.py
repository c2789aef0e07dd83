"""Drain requests on the orchestrator side: the registry's rows (SQLite and PostgreSQL),
where a drained agent stands (``drain_state``), how status shows it, and the enforcer that
re-sends what an absent agent missed."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
from sqlalchemy import select, text

from chiffon_worker.cli.status_table import status_row
from chiffon_worker.orchestrator import sql_schema
from chiffon_worker.orchestrator.agent_control import ControlAnswer
from chiffon_worker.orchestrator.agent_view import status_object
from chiffon_worker.orchestrator.drain_enforcer import ENFORCER_NAME, DrainEnforcer
from chiffon_worker.orchestrator.registry import AgentRecord, Registry
from chiffon_worker.snapshot import STORED_METRICS

from .conftest import RegistryFactory
from .feeding import feed
from .snapshots import make_snapshot

pytestmark = pytest.mark.integration
NOW = time.time()  # reset to the start of each test (conftest.fresh_now)


def fed(registry: Registry, *snapshots: dict[str, Any]) -> None:
    feed(registry, *snapshots, start=NOW, step=0.0)


def drains_rows(registry: Registry) -> list[tuple[str, float, str]]:
    table = sql_schema.drains
    with registry.engine.begin() as conn:
        rows = conn.execute(select(table.c.agent_id, table.c.requested_at,
                                   table.c.requested_by)).all()
    return [(row[0], row[1], row[2]) for row in rows]


# -- the registry's rows ------------------------------------------------------------------

def test_a_drain_is_recorded_with_its_time_and_who_asked(registry: Registry) -> None:
    fed(registry, make_snapshot("a1"))
    assert registry.drain("a1", "ops@desk", now=NOW + 5) == NOW + 5
    assert drains_rows(registry) == [("a1", NOW + 5, "ops@desk")]
    record = registry.agent("a1")
    assert record is not None and record.drain_requested_at == NOW + 5


def test_an_agent_without_a_drain_request_has_none(registry: Registry) -> None:
    fed(registry, make_snapshot("a1"), make_snapshot("a2"))
    registry.drain("a2", "ops@desk", now=NOW)
    by_id = {r.agent_id: r.drain_requested_at for r in registry.agents()}
    assert by_id == {"a1": None, "a2": NOW}


def test_a_second_drain_keeps_the_first_request(registry: Registry) -> None:
    fed(registry, make_snapshot("a1"))
    registry.drain("a1", "first@desk", now=NOW)
    assert registry.drain("a1", "second@desk", now=NOW + 60) == NOW
    assert drains_rows(registry) == [("a1", NOW, "first@desk")]


def test_undrain_deletes_the_request_and_says_whether_there_was_one(
        registry: Registry) -> None:
    fed(registry, make_snapshot("a1"))
    registry.drain("a1", "ops@desk", now=NOW)
    assert registry.undrain("a1") is True
    assert registry.undrain("a1") is False
    assert drains_rows(registry) == []
    record = registry.agent("a1")
    assert record is not None and record.drain_requested_at is None


def test_forget_deletes_the_drain_request_with_the_agent(registry: Registry) -> None:
    fed(registry, make_snapshot("a1"))
    registry.drain("a1", "ops@desk", now=NOW)
    assert registry.forget("a1") is True
    assert drains_rows(registry) == []
    fed(registry, make_snapshot("a1", boot_id="boot-again"))  # it comes back: not drained
    record = registry.agent("a1")
    assert record is not None and record.drain_requested_at is None


def test_a_heartbeats_accepting_and_work_running_are_stored(registry: Registry) -> None:
    fed(registry, make_snapshot("a1", accepting=False, accepting_reason="drained",
                                work_running=2))
    record = registry.agent("a1", with_snapshot=False)
    assert record is not None
    assert (record.accepting, record.accepting_reason, record.work_running) == (
        False, "drained", 2)


def test_an_older_agents_heartbeat_leaves_accepting_and_work_running_null(
        registry: Registry) -> None:
    fed(registry, make_snapshot("a1"))
    record = registry.agent("a1", with_snapshot=False)
    assert record is not None
    assert (record.accepting, record.accepting_reason, record.work_running) == (
        None, None, None)


def test_a_schema_2_registry_is_upgraded_to_the_current_schema_keeping_its_agents(
        registry_factory: RegistryFactory) -> None:
    registry = registry_factory()
    fed(registry, make_snapshot("old-1"))
    agents = f'"{registry.schema}".chiffon_agents' if registry.schema else "chiffon_agents"
    versions = (f'"{registry.schema}".chiffon_schema_version' if registry.schema
                else "chiffon_schema_version")
    with registry.engine.begin() as conn:  # back to what a schema-2 chiffon made
        for column in ("accepting", "accepting_reason", "work_running", "missed_seqs"):
            conn.execute(text(f"ALTER TABLE {agents} DROP COLUMN {column}"))
        conn.execute(text(f"UPDATE {versions} SET version = 2 WHERE version = 4"))
    registry.close()
    upgraded = registry_factory()
    assert upgraded.schema_version() == sql_schema.SCHEMA_VERSION == 4
    old = upgraded.agent("old-1")
    assert old is not None and old.metrics["accepting"] is None
    fed(upgraded, make_snapshot("new-1", accepting=False, accepting_reason="drained",
                                work_running=0))
    new = upgraded.agent("new-1")
    assert new is not None and (new.accepting, new.work_running) == (False, 0)


# -- where a drained agent stands ------------------------------------------------------------

def record(*, drained: bool = True, last_seen: float | None = None, **keys: Any
           ) -> AgentRecord:
    """An agent (drained a minute ago unless not ``drained``) whose newest heartbeat,
    received at ``last_seen`` (default now; timeout 90 s), carried ``keys``."""
    snap = make_snapshot("a1", **keys)
    return AgentRecord("a1", "host-a1", "pool-1", NOW - 600, NOW if last_seen is None
                       else last_seen, "boot", NOW - 600, 5, 0, 0, (), 5, NOW, None, 30.0,
                       90.0, {f.name: snap.get(f.name) for f in STORED_METRICS},
                       drain_requested_at=NOW - 60 if drained else None)


def test_an_agent_without_a_drain_request_has_no_drain_state() -> None:
    assert record(drained=False, accepting=True, work_running=0).drain_state(NOW) is None


def test_a_drained_agent_still_accepting_is_draining() -> None:
    assert record(accepting=True, work_running=0).drain_state(NOW) == "draining"


def test_a_drained_agent_with_work_running_is_draining() -> None:
    assert record(accepting=False, work_running=1).drain_state(NOW) == "draining"


def test_a_drained_agent_not_accepting_and_idle_is_drained() -> None:
    assert record(accepting=False, work_running=0).drain_state(NOW) == "drained"


def test_a_drained_agent_that_does_not_count_its_work_stays_draining() -> None:
    assert record(accepting=False, work_running=None).drain_state(NOW) == "draining"


def test_a_drained_agent_that_is_not_alive_is_drained() -> None:
    gone = record(accepting=True, work_running=1, last_seen=NOW - 3600)
    assert gone.drain_state(NOW) == "drained"


def test_status_shows_draining_or_drained_instead_of_online() -> None:
    assert status_row(record(accepting=True, work_running=0), NOW)[3] == "draining"
    assert status_row(record(accepting=False, work_running=0), NOW)[3] == "drained"
    assert status_row(record(drained=False, accepting=True), NOW)[3] == "online"


def test_status_shows_why_an_online_agent_takes_no_pool_work() -> None:
    busy = record(drained=False, accepting=False, accepting_reason="owner-busy (input 12 s ago)")
    assert status_row(busy, NOW)[3] == "owner-busy (input 12 s ago)"
    assert status_row(record(drained=False, accepting=False), NOW)[3] == "not accepting"


def test_status_keeps_an_offline_state_of_a_drained_agent() -> None:
    assert status_row(record(accepting=True, last_seen=NOW - 3600), NOW)[3] == "lost"


def test_status_json_says_the_drain_state_and_when_it_was_asked() -> None:
    shown = status_object(record(accepting=False, work_running=0), NOW)
    assert (shown["drain"], shown["drain_requested_at"]) == ("drained", NOW - 60)
    plain = status_object(record(drained=False, accepting=True), NOW)
    assert (plain["drain"], plain["drain_requested_at"]) == (None, None)


# -- the enforcer ------------------------------------------------------------------------

class FakeControl:
    """Records what the enforcer sends; every agent answers."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict[str, Any]]] = []

    def drain(self, target: AgentRecord, *, by: str, at: float) -> ControlAnswer:
        self.sent.append(("drain", target.agent_id, {"by": by, "at": at}))
        return ControlAnswer({"ok": "no longer consuming"})

    def undrain(self, target: AgentRecord) -> ControlAnswer:
        self.sent.append(("undrain", target.agent_id, {}))
        return ControlAnswer({"ok": "consuming"})


def test_the_enforcer_re_sends_a_drain_to_an_alive_agent_that_still_accepts() -> None:
    control = FakeControl()
    assert DrainEnforcer(control).enforce([record(accepting=True)], NOW) == [("a1", "drain")]
    assert control.sent == [("drain", "a1", {"by": ENFORCER_NAME, "at": NOW - 60})]


def test_the_enforcer_tells_an_agent_at_most_once_per_resend_period() -> None:
    control = FakeControl()
    enforcer = DrainEnforcer(control, resend_seconds=30.0)
    accepting = record(accepting=True)
    enforcer.enforce([accepting], NOW)
    assert enforcer.enforce([accepting], NOW + 29) == []
    assert enforcer.enforce([accepting], NOW + 31) == [("a1", "drain")]


def test_the_enforcer_leaves_agents_that_obey_or_cannot_hear_alone() -> None:
    control = FakeControl()
    records = [record(accepting=False, work_running=1),                # obeys, draining
               dataclasses.replace(record(accepting=True, last_seen=NOW - 3600),
                                   agent_id="a2"),                     # lost
               dataclasses.replace(record(drained=False, accepting=True), agent_id="a3")]
    assert DrainEnforcer(control).enforce(records, NOW) == []
    assert control.sent == []


def test_the_enforcer_undrains_an_agent_still_drained_without_a_request() -> None:
    control = FakeControl()
    missed = record(drained=False, accepting=False, accepting_reason="drained")
    assert DrainEnforcer(control).enforce([missed], NOW) == [("a1", "undrain")]


def test_the_enforcer_leaves_a_pool_left_out_for_another_reason_alone() -> None:
    control = FakeControl()
    chosen = record(drained=False, accepting=False, accepting_reason="pool queue not selected")
    assert DrainEnforcer(control).enforce([chosen], NOW) == []


def test_the_enforcer_reads_what_it_needs_from_registry_records(registry: Registry) -> None:
    fed(registry, make_snapshot("a1", accepting=True, work_running=0, timeout=3600),
        make_snapshot("a2", accepting=False, accepting_reason="drained", work_running=0,
                      timeout=3600))
    registry.drain("a1", "ops@desk", now=NOW)
    control = FakeControl()
    sent = DrainEnforcer(control).enforce(registry.agents(), time.time())
    assert sent == [("a1", "drain"), ("a2", "undrain")]
