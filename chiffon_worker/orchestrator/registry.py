"""The registry: what the orchestrator knows about every agent, in SQLite or PostgreSQL.

One code path through SQLAlchemy Core. ``Config.effective_database_url`` picks the
database: SQLite at ``state_dir/registry.sqlite3`` by default (the directory is created;
WAL journal so ``chiffon status`` can read while the orchestrator writes), PostgreSQL when
``database_url`` is set. Tables are created on first open and versioned in
``chiffon_schema_version``.

Writes come in batches (:meth:`Registry.write_batch`, one transaction each). Every
database failure surfaces as one :class:`~chiffon_worker.errors.RegistryError` naming the
registry (password masked) and the cause; a failed transaction is rolled back, so what was
stored before stays intact. One orchestrator process writes a registry; any number read it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Select,
    Table,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import RowMapping, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.schema import CreateSchema

from chiffon_worker.config import Config, mask_url
from chiffon_worker.errors import RegistryError
from chiffon_worker.orchestrator import sql_schema
from chiffon_worker.orchestrator.liveness import (
    Liveness,
    SignsOfLife,
    State,
    conflict_is_current,
    liveness_of,
)
from chiffon_worker.snapshot import HISTORY_FIELDS, STORED_METRICS

log = logging.getLogger(__name__)

#: Points of history kept per agent (at a 30 s interval, about 8 hours).
DEFAULT_HISTORY_POINTS = 1000
_PG_LOCK_KEY = 0x63686966  # "chif": serialises schema creation between processes
_SQLITE_BUSY_TIMEOUT_SECONDS = 30.0
_PG_CONNECT_TIMEOUT_SECONDS = 10


#: Snapshot keys stored as metric columns: a record's metric attributes.
METRIC_NAMES: frozenset[str] = frozenset(f.name for f in STORED_METRICS)
#: Snapshot keys the registry keeps a history of, in column order.
HISTORY_NAMES: tuple[str, ...] = tuple(f.name for f in HISTORY_FIELDS)


@dataclass(frozen=True, slots=True)
class Conflict:
    """A second live process claiming an agent's id: its host, boot, and when its newest
    heartbeat was received (unix seconds)."""

    hostname: str
    boot_id: str
    seen_at: float


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """One agent as stored: the newest accepted heartbeat and its sequencing state.

    Times are unix seconds (``last_seen`` is the receipt time of the newest accepted
    heartbeat); ``_gb`` values are GiB. ``snapshot`` is empty unless requested.

    ``metrics`` holds the stored metric columns by snapshot key (the fields of
    :mod:`chiffon_worker.snapshot` with a column, beyond the envelope); each is also an
    attribute: ``record.gpu_vram_available_gb`` is ``record.metrics["gpu_vram_available_gb"]``.
    """

    agent_id: str
    hostname: str
    pool: str
    first_seen: float
    last_seen: float
    boot_id: str
    started_at: float
    seq: int
    restarts: int
    missed: int
    past_boot_ids: tuple[str, ...]
    history_count: int
    collected_at: float
    clock_skew_seconds: float | None
    heartbeat_interval_seconds: float
    heartbeat_timeout_seconds: float
    metrics: Mapping[str, Any]
    snapshot: Mapping[str, Any] = field(default_factory=dict)
    #: the agent's Celery worker events, once the orchestrator has seen any
    signs: SignsOfLife | None = None
    #: the newest heartbeat of a second live process claiming this agent's id, if any
    conflict: Conflict | None = None

    def __getattr__(self, name: str) -> Any:
        """A stored metric by its snapshot key (only called for names not found above)."""
        if name in METRIC_NAMES:
            return self.metrics[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def number(self, name: str) -> float:
        """A numeric stored metric as a float (in the snapshot's unit)."""
        return float(self.metrics[name])

    def liveness(self, now: float) -> Liveness:
        """``online``, ``stopped`` or ``lost`` at ``now`` (unix seconds); see
        :func:`~chiffon_worker.orchestrator.liveness.liveness_of`."""
        state = liveness_of(self.last_seen, self.heartbeat_timeout_seconds, self.signs, now)
        if state == "online" and self.conflicting(now):
            return "conflict"
        return state

    def conflicting(self, now: float) -> bool:
        """Whether a second live process claims this agent's id at ``now``."""
        return self.conflict is not None and conflict_is_current(
            self.conflict.seen_at, self.heartbeat_interval_seconds, now)

    def state(self, now: float) -> State:
        """``online`` (alive: ``online`` or ``conflict``) or ``offline`` at ``now``: the
        coarse form of :meth:`liveness` that ``chiffon status --json`` has always carried
        in ``state``."""
        return "online" if self.liveness(now) in ("online", "conflict") else "offline"

    def age_seconds(self, now: float) -> float:
        """Seconds since the newest heartbeat was received."""
        return max(0.0, now - self.last_seen)


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    """One point of an agent's history: its receipt time (unix s) and the history fields
    (:data:`HISTORY_NAMES`, snapshot units), each also an attribute of the point."""

    received_at: float
    values: Mapping[str, float]

    def __getattr__(self, name: str) -> Any:
        """A history field by its snapshot key (only called for names not found above)."""
        if name in HISTORY_NAMES:
            return self.values[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def _describe(exc: BaseException) -> str:
    """The first line of the driver's message, with a hint for the common causes."""
    orig = getattr(exc, "orig", None) or exc
    message = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    lowered = message.lower()
    if "readonly" in lowered or "read-only" in lowered or "unable to open" in lowered:
        message += " (is the state directory writable?)"
    elif "disk is full" in lowered or "no space" in lowered:
        message += " (the disk is full; nothing of this batch was stored)"
    return message


def _prepare_sqlite(url: str) -> None:
    """Create the directory of a file-backed SQLite database."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    directory = Path(database).expanduser().parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RegistryError(f"cannot create the registry directory {directory}: "
                            f"{exc.strerror or exc}") from None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


class Registry:
    """Agents and their history in one database (see the module docstring).

    ``url``: an SQLAlchemy URL (``sqlite:///path``, ``postgresql+psycopg://...``).
    ``schema``: a PostgreSQL schema to hold the tables (created if missing); None uses the
    connection's default. ``history_points``: points kept per agent.
    """

    def __init__(self, url: str, *, schema: str | None = None,
                 history_points: int = DEFAULT_HISTORY_POINTS) -> None:
        if history_points < 1:
            raise ValueError("history_points must be at least 1")
        self.url = url
        self.masked_url = mask_url(url)
        self.history_points = history_points
        self.schema = schema
        try:
            backend = make_url(url).get_backend_name()
        except ArgumentError:
            raise RegistryError(f"registry URL {self.masked_url!r} is not a database URL"
                                ) from None
        self.dialect = backend
        self._upsert_cache: dict[str, str] = {}
        self._engine = self._create_engine(url, backend)
        try:
            self._migrate()
        except BaseException:
            self._engine.dispose()
            raise

    @classmethod
    def from_config(cls, config: Config) -> Registry:
        """The registry at ``config.effective_database_url``."""
        return cls(config.effective_database_url)

    def _create_engine(self, url: str, backend: str) -> Engine:
        try:
            if backend == "sqlite":
                _prepare_sqlite(url)
                engine = create_engine(
                    url, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_SECONDS})
                event.listen(engine, "connect", _sqlite_pragmas)
            elif backend == "postgresql":
                engine = create_engine(
                    url, pool_pre_ping=True,
                    connect_args={"connect_timeout": _PG_CONNECT_TIMEOUT_SECONDS})
            else:
                raise RegistryError(f"registry URL {self.masked_url!r}: unsupported database "
                                    f"{backend!r} (use sqlite or postgresql)")
        except (ArgumentError, ImportError) as exc:
            raise RegistryError(f"cannot use registry {self.masked_url}: {exc}") from None
        if self.schema:
            engine = engine.execution_options(schema_translate_map={None: self.schema})
        return engine

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for tests and tools; writes should go through methods)."""
        return self._engine

    def close(self) -> None:
        """Release the connection pool."""
        self._engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self, action: str) -> Iterator[Connection]:
        """One transaction; any database error becomes a RegistryError (rolled back)."""
        try:
            with self._engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise RegistryError(
                f"cannot {action} registry {self.masked_url}: {_describe(exc)}") from exc
        except OSError as exc:
            raise RegistryError(
                f"cannot {action} registry {self.masked_url}: {exc.strerror or exc}") from exc

    # -- schema ---------------------------------------------------------------------------

    def _migrate(self) -> None:
        with self._transaction("open") as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
                if self.schema:
                    conn.execute(CreateSchema(self.schema, if_not_exists=True))
            sql_schema.metadata.create_all(conn)
            current = conn.execute(select(func.max(sql_schema.schema_version.c.version))).scalar()
            if current is None:
                conn.execute(insert(sql_schema.schema_version),
                             {"version": sql_schema.SCHEMA_VERSION, "applied_at": time.time()})
                log.info("created registry %s (schema %d)", self.masked_url,
                         sql_schema.SCHEMA_VERSION)
            elif current > sql_schema.SCHEMA_VERSION:
                raise RegistryError(
                    f"registry {self.masked_url} has schema version {current}, newer than this "
                    f"chiffon understands ({sql_schema.SCHEMA_VERSION}); upgrade chiffon")
            elif current < sql_schema.SCHEMA_VERSION:
                self._upgrade(conn, current)

    def _upgrade(self, conn: Connection, current: int) -> None:
        """Migrate from ``current`` to :data:`sql_schema.SCHEMA_VERSION`, one step at a
        time, in the caller's transaction (PostgreSQL: under the advisory lock)."""
        if current < 2:
            table = sql_schema.agents
            present = {c["name"] for c in inspect(conn).get_columns(table.name,
                                                                    schema=self.schema)}
            preparer = conn.dialect.identifier_preparer
            name = preparer.format_table(table)
            if self.schema:
                name = f"{preparer.quote_schema(self.schema)}.{name}"
            for column in sql_schema.missing_agent_columns(present):
                kind = column.type.compile(dialect=conn.dialect)
                conn.execute(text(f"ALTER TABLE {name} ADD COLUMN "
                                  f"{preparer.quote(column.name)} {kind}"))
            conn.execute(insert(sql_schema.schema_version),
                         {"version": 2, "applied_at": time.time()})
            log.info("upgraded registry %s to schema 2 (GPU health, power, processes)",
                     self.masked_url)

    def schema_version(self) -> int:
        """The registry's current schema version."""
        with self._transaction("read") as conn:
            value = conn.execute(select(func.max(sql_schema.schema_version.c.version))).scalar()
        return int(value or 0)

    def trim_history(self) -> int:
        """Drop history slots beyond ``history_points`` (after lowering it); returns rows."""
        with self._transaction("trim") as conn:
            result = conn.execute(delete(sql_schema.history)
                                  .where(sql_schema.history.c.slot >= self.history_points))
        return int(result.rowcount or 0)

    # -- writes ---------------------------------------------------------------------------

    def _upsert_sql(self, table: Table, keys: Sequence[str]) -> str:
        """The upsert of ``table`` (unique on ``keys``) as driver SQL with named parameters.

        Built with SQLAlchemy Core once per table and run with ``exec_driver_sql``: for
        batches of plain values this skips SQLAlchemy's per-row parameter processing,
        which measured 20-40% of the write time.
        """
        cached = self._upsert_cache.get(table.name)
        if cached is not None:
            return cached
        dialect_insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        stmt = dialect_insert(table)
        updates = {c.name: stmt.excluded[c.name] for c in table.columns
                   if c.name not in keys and c.name != "first_seen"}
        stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_=updates)
        dialect = (self._engine.dialect if self.dialect == "postgresql"
                   else sqlite.dialect(paramstyle="named"))  # pyformat / named: dict rows
        schema_map = {None: self.schema} if self.schema else None
        sql = str(stmt.compile(dialect=dialect, schema_translate_map=schema_map,
                               render_schema_translate=bool(schema_map)))
        self._upsert_cache[table.name] = sql
        return sql

    def _upsert(self, conn: Connection, table: Table, keys: Sequence[str],
                rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert-or-update ``rows`` (every column of ``table``; unique on ``keys``)."""
        conn.exec_driver_sql(self._upsert_sql(table, keys), list(rows))

    def write_batch(self, agent_rows: Sequence[Mapping[str, Any]],
                    history_rows: Sequence[Mapping[str, Any]],
                    conflict_rows: Sequence[Mapping[str, Any]] = ()) -> None:
        """Upsert agent rows and history points in one transaction.

        ``agent_rows`` hold every column of ``chiffon_agents`` (at most one per agent id;
        an existing row keeps its ``first_seen``); ``history_rows`` every column of
        ``chiffon_history`` (at most one per agent id and slot).
        """
        if not agent_rows and not history_rows and not conflict_rows:
            return
        with self._transaction("write") as conn:
            if agent_rows:
                self._upsert(conn, sql_schema.agents, ("agent_id",), agent_rows)
            if history_rows:
                self._upsert(conn, sql_schema.history, ("agent_id", "slot"), history_rows)
            if conflict_rows:
                self._upsert(conn, sql_schema.conflicts, ("agent_id",), conflict_rows)

    def write_signs(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Upsert signs of life (every column of ``chiffon_signs_of_life``, one row per agent)."""
        if not rows:
            return
        with self._transaction("write") as conn:
            self._upsert(conn, sql_schema.signs_of_life, ("agent_id",), rows)

    def agent_ids(self) -> set[str]:
        """The ids of every agent in the registry."""
        with self._transaction("read") as conn:
            return {row[0] for row in conn.execute(select(sql_schema.agents.c.agent_id))}

    def forget(self, agent_id: str) -> bool:
        """Remove an agent and its history; returns whether it was known."""
        with self._transaction("write") as conn:
            conn.execute(delete(sql_schema.history)
                         .where(sql_schema.history.c.agent_id == agent_id))
            conn.execute(delete(sql_schema.signs_of_life)
                         .where(sql_schema.signs_of_life.c.agent_id == agent_id))
            conn.execute(delete(sql_schema.conflicts)
                         .where(sql_schema.conflicts.c.agent_id == agent_id))
            result = conn.execute(delete(sql_schema.agents)
                                  .where(sql_schema.agents.c.agent_id == agent_id))
        return bool(result.rowcount)

    # -- reads ----------------------------------------------------------------------------

    def agents(self, pool: str | None = None, *, with_snapshot: bool = False
               ) -> list[AgentRecord]:
        """Every agent (of ``pool``), ordered by pool then agent id."""
        query = _agents_query(with_snapshot).order_by(sql_schema.agents.c.pool,
                                                     sql_schema.agents.c.agent_id)
        if pool is not None:
            query = query.where(sql_schema.agents.c.pool == pool)
        with self._transaction("read") as conn:
            rows = conn.execute(query).mappings().all()
        return [_record(row) for row in rows]

    def agent(self, agent_id: str, *, with_snapshot: bool = True) -> AgentRecord | None:
        """One agent, or None when unknown."""
        query = _agents_query(with_snapshot).where(sql_schema.agents.c.agent_id == agent_id)
        with self._transaction("read") as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _record(row)

    def history(self, agent_id: str) -> list[HistoryPoint]:
        """The agent's stored history, oldest first (at most ``history_points`` points)."""
        h = sql_schema.history
        query = (select(h.c.received_at, *(h.c[name] for name in HISTORY_NAMES))
                 .where(h.c.agent_id == agent_id, h.c.slot < self.history_points)
                 .order_by(h.c.received_at))
        with self._transaction("read") as conn:
            rows = conn.execute(query).all()
        return [HistoryPoint(row[0], dict(zip(HISTORY_NAMES, row[1:], strict=True)))
                for row in rows]


_SIGN_COLUMNS = ("worker_name", "last_event_at", "event_interval_seconds", "offline_at")
#: Columns of ``chiffon_conflicts`` as read into records (prefixed: ``hostname`` clashes).
_CONFLICT_COLUMNS = {"conflict_hostname": "hostname", "conflict_boot_id": "boot_id",
                     "conflict_seen_at": "seen_at"}


def _agents_query(with_snapshot: bool) -> Select[Any]:
    """Agent rows with their signs of life (outer join: an agent may have none yet)."""
    agents, signs, conflicts = sql_schema.agents, sql_schema.signs_of_life, sql_schema.conflicts
    columns = [c for c in agents.columns if with_snapshot or c.name != "snapshot"]
    return select(*columns, *(signs.c[name] for name in _SIGN_COLUMNS),
                  *(conflicts.c[name].label(label)
                    for label, name in _CONFLICT_COLUMNS.items())).select_from(
        agents.outerjoin(signs, signs.c.agent_id == agents.c.agent_id)
        .outerjoin(conflicts, conflicts.c.agent_id == agents.c.agent_id))


def _record(row: RowMapping) -> AgentRecord:
    values = dict(row)
    sign = {name: values.pop(name) for name in _SIGN_COLUMNS}
    if sign["last_event_at"] is not None:
        values["signs"] = SignsOfLife(**sign)
    other = {name: values.pop(label) for label, name in _CONFLICT_COLUMNS.items()}
    if other["seen_at"] is not None:
        values["conflict"] = Conflict(**other)
    values["past_boot_ids"] = tuple(json.loads(values["past_boot_ids"]))
    snapshot = values.pop("snapshot", None)
    values["snapshot"] = json.loads(snapshot) if snapshot else {}
    values["metrics"] = {f.name: values.pop(f.name) for f in STORED_METRICS}
    return AgentRecord(**values)
