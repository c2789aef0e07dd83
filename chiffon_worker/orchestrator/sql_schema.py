"""The registry's SQL schema (SQLAlchemy Core), identical on SQLite and PostgreSQL.

Times are unix seconds (float); ``_gb`` columns are GiB (2^30 bytes), as in the snapshot.
The columns a snapshot fills come from its declaration (:mod:`chiffon_worker.snapshot`:
fields with a ``column``); the registry's own bookkeeping columns are declared here.

- ``schema_version``: one row per applied schema version (the highest is current).
- ``agents``: one row per agent: identity, sequencing state, liveness inputs, the flat
  metrics that routing and the exporter read, and the newest snapshot as JSON text.
- ``history``: a ring buffer of at most ``history_points`` rows per agent; a point lands
  in slot ``n % history_points`` where ``n`` counts the agent's accepted heartbeats, so
  the table stays bounded without deletes. Its metric columns are the fields declared
  with ``Column(history=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeEngine

from chiffon_worker.errors import ProtocolError
from chiffon_worker.snapshot import NEED_FIELDS, STORED_FIELDS, Field
from chiffon_worker.snapshot import Column as ColumnSpec

#: The schema this code writes; bump it and add a migration when a table changes.
#: 2: GPU health, power, processes and whether free VRAM is known (``agents`` columns
#: added by :func:`missing_agent_columns`, NULL for agents that have not reported them).
#: 3: ``accepting``, ``accepting_reason`` and ``work_running`` (drain), added the same
#: way. 4: ``missed_seqs`` (several orchestrators on one registry), and the owner and
#: wake columns ``owner_idle_seconds``, ``on_battery``, ``gpu_temperature_max_c``,
#: ``asleep``, ``mac_address``, the same way. New
#: tables (``chiffon_drains``, ``chiffon_ingest_turns``) need no bump: ``create_all`` adds
#: them anywhere.
SCHEMA_VERSION = 4
#: Largest values of the integer column types (``integer``: 32-bit, ``bigint``: 64-bit).
INT_LIMITS = {"integer": (1 << 31) - 1, "bigint": (1 << 63) - 1}

metadata = MetaData()


def _sql_type(spec: ColumnSpec) -> TypeEngine[Any]:
    if spec.sql == "text":
        return String(spec.length)
    if spec.sql == "integer":
        return Integer()
    if spec.sql == "bigint":
        return BigInteger()
    if spec.sql == "boolean":
        return Boolean(create_constraint=False)
    return Float()


#: (field, its column spec) for every snapshot field stored in ``agents``.
_STORED: tuple[tuple[Field, ColumnSpec], ...] = tuple(
    (f, f.column) for f in STORED_FIELDS if f.column is not None)


def _snapshot_column(field: Field, spec: ColumnSpec) -> Column[Any]:
    # optional fields are NULL for agents that do not send them
    return Column(field.name, _sql_type(spec), primary_key=spec.primary_key,
                  nullable=field.nullable or not field.required, index=spec.indexed or None)


schema_version = Table(
    "chiffon_schema_version", metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_at", Float, nullable=False),
)

agents = Table(
    "chiffon_agents", metadata,
    *(_snapshot_column(f, spec) for f, spec in _STORED),
    Column("first_seen", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("restarts", BigInteger, nullable=False),
    Column("missed", BigInteger, nullable=False),
    Column("past_boot_ids", Text, nullable=False),
    # sequence numbers of the current process counted missed, newest last (JSON list;
    # NULL in rows written before schema 4): a late heartbeat takes its number back
    Column("missed_seqs", Text, nullable=True),
    Column("history_count", BigInteger, nullable=False),
    Column("clock_skew_seconds", Float, nullable=True),
    Column("snapshot", Text, nullable=False),
    # every heartbeat rewrites its agent's row: leave room on each page so PostgreSQL can
    # update in place (HOT, no index writes); measured ~20% less SQL time per heartbeat
    postgresql_with={"fillfactor": 50},
)

history = Table(
    "chiffon_history", metadata,
    Column("agent_id", agents.c.agent_id.type, nullable=False),
    Column("slot", Integer, nullable=False),
    Column("received_at", Float, nullable=False),
    *(Column(f.name, _sql_type(spec), nullable=f.nullable) for f, spec in _STORED
      if spec.history),
    PrimaryKeyConstraint("agent_id", "slot"),
    postgresql_with={"fillfactor": 80},  # ring slots are rewritten in place (HOT)
)

#: Signs of life from Celery's worker events, one row per agent (see ``liveness``). Its own
#: table: written every second by the event listener, apart from the capacity rows, and
#: created in an existing registry by ``create_all`` (additive: no schema version bump).
signs_of_life = Table(
    "chiffon_signs_of_life", metadata,
    Column("agent_id", agents.c.agent_id.type, primary_key=True),
    Column("worker_name", agents.c.agent_id.type, nullable=False),
    Column("last_event_at", Float, nullable=False),
    Column("event_interval_seconds", Float, nullable=False),
    Column("offline_at", Float, nullable=True),
    postgresql_with={"fillfactor": 50},
)

#: The turn of the orchestrators writing heartbeats into this registry: one row, whose
#: update every heartbeat batch makes first, so batches of several orchestrators commit
#: one at a time. ``generation`` counts the batches; an orchestrator that finds it one
#: above the value it wrote last knows nobody else wrote in between (its memory of the
#: agents is current); ``writer`` says who wrote last. Additive: made by ``create_all``.
ingest_turns = Table(
    "chiffon_ingest_turns", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("generation", BigInteger, nullable=False),
    Column("writer", String(200), nullable=False),
)

#: A second live process claiming an agent's id: its newest heartbeat (host, boot, receipt
#: time); one row per agent, kept after the conflict ends (``seen_at`` tells when it was).
conflicts = Table(
    "chiffon_conflicts", metadata,
    Column("agent_id", agents.c.agent_id.type, primary_key=True),
    Column("hostname", agents.c.agent_id.type, nullable=False),
    Column("boot_id", agents.c.agent_id.type, nullable=False),
    Column("seen_at", Float, nullable=False),
)

#: The keys work can need (``needs={key: amount}``), one reservation column each.
NEED_KEYS: tuple[str, ...] = tuple(f.need.key for f in NEED_FIELDS if f.need is not None)

#: Placed work and the capacity it holds against its agent until it ends (see
#: ``orchestrator/reservations.py``); also work the agents' task events show running.
#: One row per work id, kept a day after it ended. Additive: created by ``create_all``.
reservations = Table(
    "chiffon_reservations", metadata,
    Column("work_id", agents.c.agent_id.type, primary_key=True),
    Column("agent_id", agents.c.agent_id.type, nullable=False, index=True),
    Column("pool", agents.c.agent_id.type, nullable=False),
    Column("work_type", agents.c.agent_id.type, nullable=False),
    *(Column(key, Float, nullable=False) for key in NEED_KEYS),
    Column("state", String(16), nullable=False, index=True),
    Column("placed_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("ended_at", Float, nullable=True),
    Column("submitter", agents.c.agent_id.type, nullable=False),
)

#: One row whose update serialises placements across threads, processes and hosts (a
#: row lock on PostgreSQL, the write lock on SQLite): read, choose and reserve happen
#: under it, so two submitters never both take the last room on an agent.
placement_lock = Table(
    "chiffon_placement_lock", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("placements", BigInteger, nullable=False),
)

#: Operators' drain requests (``chiffon drain``), one row per agent: routing skips the
#: agent and the orchestrator re-sends the drain to it until its heartbeats say it is not
#: accepting. Its own table (additive: created in an existing registry by ``create_all``).
drains = Table(
    "chiffon_drains", metadata,
    Column("agent_id", agents.c.agent_id.type, primary_key=True),
    Column("requested_at", Float, nullable=False),  # unix seconds
    Column("requested_by", Text, nullable=False),   # user@host of the operator
)

#: This registry's own id (one row), made at creation: a second registry's copy queue is
#: named after it (``chiffon orchestrator --copy``). Additive: created by ``create_all``.
registry_info = Table(
    "chiffon_registry_info", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("registry_id", String(64), nullable=False),
)

#: Columns of ``agents`` copied straight from a snapshot's keys (``agent_id`` first).
SNAPSHOT_COLUMNS: tuple[str, ...] = tuple(f.name for f in STORED_FIELDS)
#: Those of them every snapshot carries, and those older agents may leave out.
REQUIRED_COLUMNS: tuple[str, ...] = tuple(f.name for f in STORED_FIELDS if f.required)
OPTIONAL_COLUMNS: tuple[str, ...] = tuple(f.name for f in STORED_FIELDS if not f.required)


def qualified_name(table: Table, schema: str | None, dialect: Dialect) -> str:
    """``table``'s name quoted for driver SQL in ``dialect``, prefixed with the registry's
    ``schema`` where it has one (None: the search path's)."""
    preparer = dialect.identifier_preparer
    name = preparer.quote(table.name)
    return f"{preparer.quote_schema(schema)}.{name}" if schema else name


def missing_agent_columns(present: set[str]) -> list[Column[Any]]:
    """The columns of ``agents`` a registry made by an older chiffon lacks, given the
    names it has (the step from any older schema to this one: every such column is
    nullable)."""
    return [c for c in agents.columns if c.name not in present]
#: Columns of ``history`` holding metrics (besides agent_id, slot, received_at).
HISTORY_METRICS: tuple[str, ...] = tuple(f.name for f, spec in _STORED if spec.history)

_TEXT_COLUMNS = tuple(f.name for f, spec in _STORED if spec.sql == "text")
_INT_COLUMNS = tuple((f.name, INT_LIMITS[spec.sql]) for f, spec in _STORED
                     if spec.sql in INT_LIMITS)


def check_storable(snap: Mapping[str, Any]) -> None:
    """Refuse values a valid snapshot may carry but a registry column cannot hold.

    A NUL character or a lone surrogate in a text column, or an integer beyond the
    column's range, would fail the whole batch's transaction on every retry (a poison
    message); such a heartbeat is rejected as invalid instead (ProtocolError).
    """
    for key in _TEXT_COLUMNS:
        value: str | None = snap.get(key)
        if value is None:
            continue  # an optional column an older agent does not fill
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ProtocolError(key, "is not valid Unicode text") from None
        if "\x00" in value:
            raise ProtocolError(key, "must not contain NUL characters")
    for key, limit in _INT_COLUMNS:
        number = snap.get(key)
        if number is not None and number > limit:
            raise ProtocolError(key, f"is larger than {limit}")
