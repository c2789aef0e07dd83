"""The registry, the same suite on SQLite (tmp_path) and on the machine's PostgreSQL."""

from __future__ import annotations

import logging
import random
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, insert, make_url, text

from chiffon_worker.errors import RegistryError
from chiffon_worker.orchestrator import pg_bulk, sql_schema
from chiffon_worker.orchestrator.registry import Registry, SequencingState
from tests.conftest import POSTGRES_URL, require_port

from . import feeding
from .conftest import RegistryFactory
from .feeding import Feeder
from .snapshots import make_snapshot, random_snapshot

pytestmark = pytest.mark.integration
T0 = float(int(time.time()))  # receipt times near the snapshots' collected_at


def feed(registry: Registry, *snapshots: dict, start: float = T0, step: float = 30.0
         ) -> Feeder:
    """Ingest ``snapshots`` received ``step`` seconds apart from ``start``; one batch."""
    return feeding.feed(registry, *snapshots, start=start, step=step)


def test_a_new_registry_creates_its_tables_at_the_current_schema_version(
        registry: Registry) -> None:
    assert registry.schema_version() == sql_schema.SCHEMA_VERSION
    assert registry.agents() == []


def test_one_row_per_agent_holds_identity_sequencing_and_the_newest_snapshot(
        registry: Registry) -> None:
    feed(registry, make_snapshot("a1", seq=1, collected_at=T0),
         make_snapshot("a1", seq=2, vram_available_gb=3.5, collected_at=T0 + 30))
    [record] = registry.agents(with_snapshot=True)
    assert (record.agent_id, record.hostname, record.pool) == ("a1", "host-a1", "desktop_pool_1")
    assert (record.first_seen, record.last_seen) == (T0, T0 + 30)
    assert (record.boot_id, record.seq, record.restarts, record.missed) == ("boot-a1", 2, 0, 0)
    assert record.gpu_vram_available_gb == 3.5
    assert record.snapshot["gpu_vram_available_gb"] == 3.5
    assert record.snapshot["gpus"][0]["name"] == "NVIDIA GeForce RTX 4090"
    assert record.clock_skew_seconds is None


def test_unicode_text_and_extreme_but_valid_numbers_round_trip(registry: Registry) -> None:
    feed(registry, make_snapshot("a1", hostname="wörkstätion-東京", seq=(1 << 63) - 1,
                                 cores_physical=(1 << 31) - 1, started_at=1e300,
                                 load_1min=1e-300, gpus_note="\x00 in nested JSON is fine"))
    record = registry.agent("a1")
    assert record is not None
    assert record.hostname == "wörkstätion-東京"
    assert (record.seq, record.cpu_cores_physical) == ((1 << 63) - 1, (1 << 31) - 1)
    assert (record.started_at, record.cpu_load_1min) == (1e300, 1e-300)
    assert record.snapshot["gpus_note"] == "\x00 in nested JSON is fine"


def test_first_seen_survives_later_batches_and_everything_survives_a_reopen(
        registry_factory: RegistryFactory) -> None:
    first = registry_factory()
    feed(first, make_snapshot("a1", seq=1, collected_at=T0))
    feed(first, make_snapshot("a1", seq=2, collected_at=T0 + 300), start=T0 + 300)
    first.close()
    reopened = registry_factory()
    record = reopened.agent("a1")
    assert record is not None
    assert (record.first_seen, record.last_seen, record.seq) == (T0, T0 + 300, 2)
    assert reopened.history("a1")[-1].received_at == T0 + 300


def test_sequencing_state_is_reloaded_so_a_replayed_heartbeat_stays_ignored_after_restart(
        registry_factory: RegistryFactory) -> None:
    feed(registry_factory(), make_snapshot("a1", seq=5, collected_at=T0))
    feeder = Feeder(registry_factory())
    outcome = feeder.snapshot(make_snapshot("a1", seq=5), received_at=T0 + 60)
    assert (outcome.kind, outcome.reason) == ("ignored", "duplicate")


def test_restarts_and_missed_heartbeats_are_counted_per_agent(registry: Registry) -> None:
    feed(registry,
         make_snapshot("a1", seq=1), make_snapshot("a1", seq=2), make_snapshot("a1", seq=6),
         make_snapshot("a1", seq=1, boot_id="boot-2", started_at=T0 + 200),
         make_snapshot("a1", seq=3, boot_id="boot-2", started_at=T0 + 200))
    record = registry.agent("a1")
    assert record is not None
    assert (record.boot_id, record.seq, record.restarts, record.missed) == ("boot-2", 3, 1, 4)
    assert record.past_boot_ids == ("boot-a1",)


def test_history_is_a_bounded_ring_returned_oldest_first(
        registry_factory: RegistryFactory) -> None:
    registry = registry_factory(history_points=5)
    snaps = [make_snapshot("a1", seq=n, load_1min=float(n)) for n in range(1, 13)]
    feeder = Feeder(registry)
    for n, snap in enumerate(snaps):  # several batches, wrapping the ring twice
        feeder.snapshot(snap, received_at=T0 + n)
        if n % 4 == 3:
            feeder.commit()
    feeder.commit()
    points = registry.history("a1")
    assert [p.cpu_load_1min for p in points] == [8.0, 9.0, 10.0, 11.0, 12.0]
    assert [p.received_at for p in points] == sorted(p.received_at for p in points)


def test_lowering_history_points_trims_the_extra_slots(
        registry_factory: RegistryFactory) -> None:
    feed(registry_factory(), *(make_snapshot("a1", seq=n) for n in range(1, 11)))
    smaller = registry_factory(history_points=3)
    assert smaller.trim_history() == 7
    assert len(smaller.history("a1")) == 3


def test_agents_can_be_listed_by_pool_and_forgotten(registry: Registry) -> None:
    feed(registry, make_snapshot("a1", pool="p1"), make_snapshot("a2", pool="p2"),
         make_snapshot("a3", pool="p1"))
    assert [r.agent_id for r in registry.agents("p1")] == ["a1", "a3"]
    assert registry.forget("a1") is True
    assert registry.forget("a1") is False
    assert registry.agent("a1") is None
    assert registry.history("a1") == []
    assert [r.agent_id for r in registry.agents()] == ["a3", "a2"]  # by pool, then id


def test_liveness_uses_receipt_time_and_the_agents_own_timeout(registry: Registry) -> None:
    feed(registry, make_snapshot("fast", timeout=10.0, collected_at=T0 - 3600),
         make_snapshot("slow", timeout=600.0), step=0.0)
    by_id = {r.agent_id: r for r in registry.agents()}
    assert by_id["fast"].clock_skew_seconds == pytest.approx(-3600)
    assert by_id["fast"].state(T0 + 9) == "online"
    assert by_id["fast"].state(T0 + 11) == "offline"
    assert by_id["slow"].state(T0 + 300) == "online"


def test_a_registry_written_by_a_newer_chiffon_is_refused(
        registry_factory: RegistryFactory) -> None:
    registry = registry_factory()
    with registry.engine.begin() as conn:
        conn.execute(insert(sql_schema.schema_version),
                     {"version": sql_schema.SCHEMA_VERSION + 1, "applied_at": time.time()})
    with pytest.raises(RegistryError, match="newer than this chiffon"):
        registry_factory()


def test_a_failed_batch_stores_nothing_and_leaves_earlier_data_intact(
        registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    feed(registry, make_snapshot("a1", seq=1))
    feeder = Feeder(registry)
    feeder.snapshot(make_snapshot("a1", seq=2), received_at=T0 + 30)
    feeder.snapshot(make_snapshot("a2", seq=1), received_at=T0 + 30)
    batch = feeder.writer.take_batch()
    assert batch is not None
    agent_rows, history_rows = batch.agent_rows, batch.history_rows
    broken = [*history_rows, {"agent_id": "a2", "slot": 1}]  # NOT NULL columns missing
    with pytest.raises(RegistryError, match="cannot write registry"):
        registry.write_batch(agent_rows, broken)
    assert [r.agent_id for r in registry.agents()] == ["a1"]
    record = registry.agent("a1")
    assert record is not None and record.seq == 1
    registry.write_batch(agent_rows, history_rows)  # the registry still works
    assert [r.agent_id for r in registry.agents()] == ["a1", "a2"]


#: The tables as the first release created them (SQLite DDL): columns in another order
#: than today's, which is derived from the snapshot declaration.
FIRST_RELEASE_DDL = """
CREATE TABLE chiffon_schema_version (version INTEGER NOT NULL, applied_at FLOAT NOT NULL,
    PRIMARY KEY (version));
INSERT INTO chiffon_schema_version VALUES (1, 0.0);
CREATE TABLE chiffon_agents (agent_id VARCHAR(256) NOT NULL, hostname VARCHAR(256) NOT NULL,
    pool VARCHAR(256) NOT NULL, first_seen FLOAT NOT NULL, last_seen FLOAT NOT NULL,
    boot_id VARCHAR(256) NOT NULL, started_at FLOAT NOT NULL, seq BIGINT NOT NULL,
    restarts BIGINT NOT NULL, missed BIGINT NOT NULL, past_boot_ids TEXT NOT NULL,
    history_count BIGINT NOT NULL, collected_at FLOAT NOT NULL, clock_skew_seconds FLOAT,
    heartbeat_interval_seconds FLOAT NOT NULL, heartbeat_timeout_seconds FLOAT NOT NULL,
    cpu_load_1min FLOAT NOT NULL, cpu_cores_physical INTEGER NOT NULL,
    cpu_cores_available FLOAT NOT NULL, memory_available_gb FLOAT NOT NULL,
    memory_total_gb FLOAT NOT NULL, gpu_type VARCHAR(16) NOT NULL,
    gpu_vram_available_gb FLOAT NOT NULL, gpu_vram_total_gb FLOAT NOT NULL,
    snapshot TEXT NOT NULL, PRIMARY KEY (agent_id));
CREATE INDEX ix_chiffon_agents_pool ON chiffon_agents (pool);
CREATE TABLE chiffon_history (agent_id VARCHAR(256) NOT NULL, slot INTEGER NOT NULL,
    received_at FLOAT NOT NULL, cpu_load_1min FLOAT NOT NULL,
    cpu_cores_available FLOAT NOT NULL, memory_available_gb FLOAT NOT NULL,
    gpu_vram_available_gb FLOAT NOT NULL, PRIMARY KEY (agent_id, slot));
"""


def test_a_registry_created_by_the_first_release_keeps_working(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(FIRST_RELEASE_DDL)
    with Registry(f"sqlite:///{path}") as registry:
        feed(registry, make_snapshot("a1", seq=1, vram_available_gb=3.5, collected_at=T0),
             make_snapshot("a1", seq=2, vram_available_gb=4.5, collected_at=T0 + 30))
        record = registry.agent("a1")
        assert record is not None
        assert (record.seq, record.gpu_vram_available_gb) == (2, 4.5)
        assert [p.gpu_vram_available_gb for p in registry.history("a1")] == [3.5, 4.5]


def _first_release_registry_holding_an_agent(url: str, schema: str | None) -> None:
    statements = [s for s in FIRST_RELEASE_DDL.split(";") if s.strip()]
    engine = create_engine(url)
    with engine.begin() as conn:
        if schema:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            conn.execute(text(f'SET search_path TO "{schema}"'))
        for statement in statements:
            conn.execute(text(statement))
        conn.execute(text(
            "INSERT INTO chiffon_agents VALUES ('old-1', 'h', 'p', 1.0, 1.0, 'b', 1.0, 1, 0, "
            "0, '[]', 1, 1.0, NULL, 30.0, 90.0, 0.5, 8, 7.5, 10.0, 16.0, 'none', 0.0, 0.0, "
            "'{}')"))
    engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_first_release_registry_is_upgraded_to_the_current_schema_keeping_its_agents(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if backend == "sqlite":
        url, schema = f"sqlite:///{tmp_path / 'old.sqlite3'}", None
    else:
        url, schema = POSTGRES_URL, request.getfixturevalue("pg_schema")
    _first_release_registry_holding_an_agent(url, schema)
    with Registry(url, schema=schema) as registry:
        assert registry.schema_version() == sql_schema.SCHEMA_VERSION == 4
        old = registry.agent("old-1")
        assert old is not None and old.metrics["gpu_health"] is None
        assert old.missed_seqs == ()
        feed(registry, make_snapshot("new-1", gpu_health="degraded", gpu_power_draw_w=312.5,
                                     gpu_vram_known=False, gpu_processes=3))
        new = registry.agent("new-1")
        assert new is not None
        assert (new.gpu_health, new.gpu_power_draw_w, new.gpu_vram_known,
                new.gpu_processes) == ("degraded", 312.5, False, 3)
    with Registry(url, schema=schema) as again:  # opening it again changes nothing
        assert again.schema_version() == 4


def test_stored_agents_rows_are_rewritten_keeping_first_seen(registry: Registry) -> None:
    feeder = Feeder(registry)
    for seq, at in ((1, T0), (2, T0 + 30)):
        feeder.snapshot(make_snapshot("a1", seq=seq, cpu_load_1min=seq / 2), received_at=at)
        feeder.snapshot(make_snapshot(f"new-{seq}", seq=1), received_at=at)
        batch = feeder.writer.take_batch()
        assert batch is not None
        assert batch.stored == ({"a1"} if seq == 2 else set())
        registry.write_batch(batch.agent_rows, batch.history_rows, stored=batch.stored)
    records = {r.agent_id: r for r in registry.agents()}
    assert (records["a1"].seq, records["a1"].first_seen, records["a1"].last_seen,
            records["a1"].metrics["cpu_load_1min"]) == (2, T0, T0 + 30, 1.0)
    assert sorted(records) == ["a1", "new-1", "new-2"]


def test_sqlite_updates_stored_agents_rows_in_place(sqlite_registry: Registry) -> None:
    feed(sqlite_registry, make_snapshot("a1", seq=1))
    statements: list[str] = []
    event.listen(sqlite_registry._engine, "before_cursor_execute",
                 lambda _c, _cur, sql, *_rest: statements.append(sql))
    feed(sqlite_registry, make_snapshot("a1", seq=2), start=T0 + 30)
    writes = [sql.split()[0] for sql in statements
              if sql.startswith(("INSERT INTO chiffon_agents", "UPDATE chiffon_agents"))]
    assert writes == ["UPDATE"]


def test_a_row_said_stored_but_gone_is_written_all_the_same(registry: Registry) -> None:
    # an agent forgotten between the judge's reading and the write: nothing is lost
    feed(registry, make_snapshot("a1", seq=1), make_snapshot("a2", seq=1))
    feeder = Feeder(registry)
    feeder.snapshot(make_snapshot("a1", seq=2), received_at=T0 + 30)
    feeder.snapshot(make_snapshot("a2", seq=2), received_at=T0 + 30)
    batch = feeder.writer.take_batch()
    assert batch is not None and batch.stored == {"a1", "a2"}
    registry.forget("a2")
    registry.write_batch(batch.agent_rows, batch.history_rows, stored=batch.stored)
    assert [(r.agent_id, r.seq) for r in registry.agents()] == [("a1", 2), ("a2", 2)]


def test_a_turn_reads_the_stored_sequencing_state_of_the_agents_asked(
        registry: Registry) -> None:
    # a restart (past boot ids) and a gap (missed seqs): the JSON list columns round-trip
    feed(registry, make_snapshot("a1", seq=1, boot_id="b1"), make_snapshot("a2", seq=1),
         make_snapshot("a1", seq=1, boot_id="b2", started_at=1_764_000_100.0),
         make_snapshot("a1", seq=4, boot_id="b2", started_at=1_764_000_100.0))
    with registry.ingest_turn("spec") as turn:
        states = turn.agents(["a1", "never-seen", "a1"])
    assert len(states) == 1
    state = states[0]
    record = registry.agent("a1")
    assert record is not None
    assert state == SequencingState(
        agent_id="a1", hostname=record.hostname, first_seen=T0, last_seen=T0 + 90,
        boot_id="b2", started_at=1_764_000_100.0, seq=4, restarts=1, missed=2,
        missed_seqs=(2, 3), past_boot_ids=("b1",), history_count=3,
        clock_skew_seconds=record.clock_skew_seconds, heartbeat_interval_seconds=30.0)


def big_batch(feeder: Feeder, seq: int, received_at: float) -> None:
    """``pg_bulk.MIN_ROWS`` + 5 agents' heartbeats (PostgreSQL writes them with COPY)."""
    for n in range(pg_bulk.MIN_ROWS + 5):
        feeder.snapshot(make_snapshot(f"bulk-{n:03d}", seq=seq, collected_at=received_at,
                                      cpu_load_1min=n / 10, gpu_type="none" if n % 2 else
                                      "nvidia"), received_at=received_at)


def test_a_large_batch_stores_every_value_and_keeps_each_first_seen(
        registry: Registry) -> None:
    feeder = Feeder(registry)
    big_batch(feeder, 1, T0)
    feeder.commit()
    big_batch(feeder, 2, T0 + 30)
    feeder.commit()
    records = registry.agents(with_snapshot=True)
    assert len(records) == pg_bulk.MIN_ROWS + 5
    for n, record in enumerate(records):
        assert (record.agent_id, record.seq, record.first_seen, record.last_seen) == \
            (f"bulk-{n:03d}", 2, T0, T0 + 30)
        assert record.metrics["cpu_load_1min"] == n / 10
        assert record.snapshot["gpu_type"] == ("none" if n % 2 else "nvidia")
        assert [p.received_at for p in registry.history(record.agent_id)] == [T0, T0 + 30]


def test_a_large_batch_that_fails_stores_nothing(registry: Registry) -> None:
    feed(registry, make_snapshot("a1", seq=1))
    feeder = Feeder(registry)
    big_batch(feeder, 1, T0 + 30)
    batch = feeder.writer.take_batch()
    assert batch is not None
    broken = [*batch.history_rows[:-1], {**batch.history_rows[-1], "received_at": None}]
    with pytest.raises(RegistryError, match="cannot write registry"):
        registry.write_batch(batch.agent_rows, broken)
    assert [r.agent_id for r in registry.agents()] == ["a1"]
    registry.write_batch(batch.agent_rows, batch.history_rows)  # the registry still works
    assert len(registry.agents()) == pg_bulk.MIN_ROWS + 6


@pytest.mark.parametrize(("column", "value", "problem"), [
    ("cpu_cores_physical", 2**31, "out of range for type integer"),
    ("work_running", -(2**31) - 1, "out of range for type integer"),
    ("accepting", "f", "is not a boolean"),
    ("cpu_cores_physical", "8", "cannot be written"),
    ("restarts", 2**63, "cannot be written"),
    ("memory_available_gb", "12.5", "cannot be written"),
])
def test_a_copied_value_its_column_cannot_hold_fails_the_batch_and_stores_nothing(
        pg_schema: str, column: str, value: Any, problem: str) -> None:
    # the binary COPY's own dumpers would wrap integers and take any value's truth
    with Registry(POSTGRES_URL, schema=pg_schema) as registry:
        feed(registry, make_snapshot("a1", seq=1))
        feeder = Feeder(registry)
        big_batch(feeder, 1, T0 + 30)
        batch = feeder.writer.take_batch()
        assert batch is not None
        rows = [*batch.agent_rows[:-1], {**batch.agent_rows[-1], column: value}]
        with pytest.raises(RegistryError, match=problem):
            registry.write_batch(rows, batch.history_rows)
        assert [r.agent_id for r in registry.agents()] == ["a1"]


def test_postgresql_writes_large_batches_with_copy_and_small_ones_row_by_row(
        pg_schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(POSTGRES_URL, schema=pg_schema)
    copied: list[int] = []
    bulk_upsert = pg_bulk.bulk_upsert

    def spy(conn: Any, bulk: pg_bulk.BulkUpsert, rows: Any) -> None:
        rows = list(rows)
        copied.append(len(rows))
        bulk_upsert(conn, bulk, rows)

    monkeypatch.setattr(pg_bulk, "bulk_upsert", spy)
    feed(registry, make_snapshot("small", seq=1))
    assert copied == []
    feeder = Feeder(registry)
    big_batch(feeder, 1, T0)
    feeder.commit()
    registry.close()
    assert copied == [pg_bulk.MIN_ROWS + 5] * 2  # the agents' rows, then their history


def test_a_batch_copied_in_binary_stores_exactly_what_row_by_row_writes(
        pg_schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # today's heartbeats: ints in float columns, nulls, booleans, nested JSON text
    rng = random.Random(7)
    count = pg_bulk.MIN_ROWS + 5
    snaps = [random_snapshot(rng, f"bin-{n:03d}", 1) for n in range(count)]
    tables = {}
    for schema, min_rows in ((pg_schema, pg_bulk.MIN_ROWS), (f"{pg_schema}_rows", count + 1)):
        monkeypatch.setattr(pg_bulk, "MIN_ROWS", min_rows)
        try:
            with Registry(POSTGRES_URL, schema=schema) as registry:
                feeder = Feeder(registry)
                for snap in snaps:
                    feeder.snapshot(snap, received_at=T0)
                feeder.commit()
                with registry._engine.connect() as conn:
                    tables[schema] = [conn.execute(text(
                        f'SELECT * FROM "{schema}".{name} ORDER BY {order}')).all()
                        for name, order in (("chiffon_agents", "agent_id"),
                                            ("chiffon_history", "agent_id, slot"))]
        finally:
            if schema != pg_schema:  # the fixture drops its own
                with create_engine(POSTGRES_URL).begin() as conn:
                    conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    copied, row_by_row = tables.values()
    assert [len(rows) for rows in copied] == [count, count]
    assert copied == row_by_row


@pytest.fixture
def user_without_temp_tables() -> Iterator[str]:
    """A registry URL for a least-privileged PostgreSQL user: a database of its own
    (TEMPORARY revoked from PUBLIC there only; no CREATE on it) where it owns one schema,
    named after it; dropped after."""
    require_port("127.0.0.1", 5432, "PostgreSQL")
    name = f"chiffon_notemp_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE ROLE "{name}" LOGIN'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
        conn.execute(text(f'REVOKE TEMPORARY ON DATABASE "{name}" FROM PUBLIC'))
    owner = create_engine(POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}",
                          isolation_level="AUTOCOMMIT")
    with owner.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{name}" AUTHORIZATION "{name}"'))
    owner.dispose()
    try:
        yield f"postgresql+psycopg://{name}@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'DROP ROLE IF EXISTS "{name}"'))
        admin.dispose()


def test_a_user_owning_only_its_schema_opens_the_registry_in_it(
        user_without_temp_tables: str) -> None:
    schema = make_url(user_without_temp_tables).username
    with Registry(user_without_temp_tables, schema=schema) as registry:
        assert registry.schema_version() == sql_schema.SCHEMA_VERSION


def test_a_postgresql_user_without_temporary_tables_is_told_once_and_writes_row_by_row(
        user_without_temp_tables: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="chiffon_worker.orchestrator.registry")
    schema = make_url(user_without_temp_tables).username
    with Registry(user_without_temp_tables, schema=schema) as registry:
        feeder = Feeder(registry)
        big_batch(feeder, 1, T0)
        feeder.commit()
        big_batch(feeder, 2, T0 + 30)
        feeder.commit()
        assert [r.seq for r in registry.agents()] == [2] * (pg_bulk.MIN_ROWS + 5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "may not create temporary tables" in warnings[0]
    assert "GRANT TEMPORARY" in warnings[0]
