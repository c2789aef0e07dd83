"""The orchestrator's roles of snapshot fields, all derived from ``chiffon_worker.snapshot``:
registry columns, history series, record attributes, Prometheus gauges, routable needs.

The registry's table and column names are pinned here on purpose: existing SQLite and
PostgreSQL registries must keep working, so a change to the declaration that renames a
column must fail a test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import BigInteger, Boolean, Float, Integer, String

from chiffon_worker import snapshot
from chiffon_worker.orchestrator import exporter, routing, sql_schema
from chiffon_worker.orchestrator.registry import METRIC_NAMES, AgentRecord, HistoryPoint
from chiffon_worker.snapshot import BOOL, FIELDS, Field

AGENTS_COLUMNS = {
    "agent_id", "hostname", "pool", "first_seen", "last_seen", "boot_id", "started_at", "seq",
    "restarts", "missed", "missed_seqs", "past_boot_ids", "history_count", "collected_at",
    "clock_skew_seconds", "heartbeat_interval_seconds", "heartbeat_timeout_seconds",
    "cpu_load_1min", "cpu_cores_physical", "cpu_cores_available", "memory_available_gb",
    "memory_total_gb", "gpu_type", "gpu_vram_available_gb", "gpu_vram_total_gb", "snapshot",
    # schema 2 (added to older registries by the upgrade)
    "gpu_vram_known", "gpu_health", "gpu_power_draw_w", "gpu_power_limit_w", "gpu_processes",
    "gpu_foreign_processes", "gpu_foreign_memory_gb",
    # schema 3 (drain: added the same way)
    "accepting", "accepting_reason", "work_running",
    # schema 4 (owner and wake: added the same way)
    "owner_idle_seconds", "on_battery", "gpu_temperature_max_c", "asleep", "mac_address",
}
HISTORY_COLUMNS = {"agent_id", "slot", "received_at", "cpu_load_1min", "cpu_cores_available",
                   "memory_available_gb", "gpu_vram_available_gb"}
SQL_TYPES = {"float": Float, "integer": Integer, "bigint": BigInteger, "text": String,
             "boolean": Boolean}


def fields_where(condition: Callable[[Field], bool]) -> list[Any]:
    return [pytest.param(f, id=f.name) for f in FIELDS if condition(f)]


def test_the_registry_column_names_on_disk_are_unchanged() -> None:
    assert {c.name for c in sql_schema.agents.columns} == AGENTS_COLUMNS
    assert {c.name for c in sql_schema.history.columns} == HISTORY_COLUMNS
    assert (sql_schema.agents.name, sql_schema.history.name) == ("chiffon_agents",
                                                                "chiffon_history")


@pytest.mark.parametrize("field", fields_where(lambda f: f.column is not None))
def test_every_stored_field_has_an_agents_column_of_its_sql_type(field: Field) -> None:
    assert field.column is not None
    column = sql_schema.agents.c[field.name]
    assert isinstance(column.type, SQL_TYPES[field.column.sql])
    assert column.primary_key == field.column.primary_key
    assert column.nullable == (field.nullable or not field.required)


@pytest.mark.parametrize("field", fields_where(lambda f: f.history))
def test_every_history_field_has_a_history_column_and_a_point_attribute(field: Field) -> None:
    assert field.name in sql_schema.history.c
    point = HistoryPoint(1.0, {f.name: 2.0 for f in snapshot.HISTORY_FIELDS})
    assert getattr(point, field.name) == 2.0


def test_a_record_has_an_attribute_for_every_agents_column() -> None:
    attributes = {f.name for f in dataclasses.fields(AgentRecord)} - {
        "metrics", "signs", "conflict", "drain_requested_at"}
    assert attributes | METRIC_NAMES == AGENTS_COLUMNS
    assert not attributes & METRIC_NAMES


def test_a_record_answers_unknown_attributes_with_attribute_error() -> None:
    record = AgentRecord("a", "h", "p", 0.0, 0.0, "b", 0.0, 1, 0, 0, (), 1, 0.0, None, 30.0,
                         90.0, {"gpu_type": "none"})
    assert record.gpu_type == "none"
    with pytest.raises(AttributeError, match="no_such_metric"):
        _ = record.no_such_metric


@pytest.mark.parametrize("field", fields_where(lambda f: f.gauge is not None))
def test_every_gauge_reads_a_stored_number_into_a_distinct_metric(field: Field) -> None:
    assert field.gauge is not None
    assert (field.numeric or field.types == BOOL) and field.column is not None
    assert field.gauge.name.startswith("chiffon_agent_")
    names = [name for _, name, _, _ in exporter._AGENT_GAUGES]
    assert names.count(field.gauge.name) == 1


def test_gib_gauges_are_exported_in_bytes() -> None:
    scales = {f.name: f.gauge.scale for f in snapshot.GAUGE_FIELDS if f.gauge is not None}
    assert scales["memory_available_gb"] == snapshot.GIB == 2**30
    assert scales["cpu_load_1min"] == 1.0


@pytest.mark.parametrize("field", fields_where(lambda f: f.need is not None))
def test_every_need_routes_on_a_stored_number(field: Field) -> None:
    assert field.need is not None
    assert (field.numeric or field.types == BOOL) and field.column is not None
    assert routing.NEEDS[field.need.key].attribute == field.name


def test_routing_knows_exactly_the_declared_needs() -> None:
    assert set(routing.NEEDS) == {"gpu_vram_gb", "cores", "memory_gb"}


def test_labels_and_units_are_there_for_a_status_table_or_chart() -> None:
    for field in snapshot.HISTORY_FIELDS:
        assert field.label
    by_name = snapshot.FIELDS_BY_NAME
    assert by_name["memory_available_gb"].unit_suffix == " GiB"
    assert by_name["cpu_percent"].unit_suffix == "%"
    assert by_name["cpu_load_1min"].unit_suffix == ""
