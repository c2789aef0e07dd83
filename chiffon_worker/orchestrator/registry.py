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
import operator
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from sqlalchemy import (
    Connection,
    Engine,
    Float,
    Select,
    String,
    Table,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import RowMapping, make_url
from sqlalchemy.exc import ArgumentError, InvalidRequestError, SQLAlchemyError
from sqlalchemy.schema import CreateSchema

from chiffon_worker.config import Config, mask_url
from chiffon_worker.errors import RegistryError
from chiffon_worker.orchestrator import pg_bulk, sql_schema
from chiffon_worker.orchestrator.liveness import (
    Liveness,
    SignsOfLife,
    State,
    conflict_is_current,
    liveness_of,
)
from chiffon_worker.orchestrator.reservations import ACTIVE_STATES, Reservation, WorkState
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
#: A history point's receipt time (a sort key).
_RECEIVED_AT = operator.attrgetter("received_at")
#: Where a drained agent stands: still finishing work (or not yet told), or idle and out.
DrainState = Literal["draining", "drained"]


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
    #: when an operator drained the agent (unix seconds; None: not drained)
    drain_requested_at: float | None = None
    #: sequence numbers of the current process counted in ``missed``, newest last (a late
    #: heartbeat takes its number back)
    missed_seqs: tuple[int, ...] = ()

    def __getattr__(self, name: str) -> Any:
        """A stored metric by its snapshot key (only called for names not found above)."""
        if name in METRIC_NAMES:
            return self.metrics[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def number(self, name: str) -> float:
        """A numeric stored metric as a float (in the snapshot's unit)."""
        return float(self.metrics[name])

    def liveness(self, now: float) -> Liveness:
        """``online``, ``stopped``, ``lost``, ``conflict`` or ``asleep`` at ``now`` (unix
        seconds); see :func:`agent_liveness`."""
        return agent_liveness(
            self.last_seen, self.heartbeat_timeout_seconds, self.heartbeat_interval_seconds,
            signs=self.signs, now=now,
            conflict_seen_at=None if self.conflict is None else self.conflict.seen_at,
            asleep=self.metrics.get("asleep") is True)

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

    def takes_work(self, now: float) -> bool:
        """Whether new work may go to this agent at ``now``: ``online``, not drained, and
        consuming its pool queue (``accepting`` not false)."""
        return (self.drain_requested_at is None and self.metrics.get("accepting") is not False
                and self.liveness(now) == "online")

    def drain_state(self, now: float) -> DrainState | None:
        """None without a drain request; ``drained`` when the newest heartbeat says the
        agent takes no pool work (``accepting`` false) and runs none (``work_running`` 0),
        or the agent is not alive at ``now`` (nothing can run there); else ``draining``."""
        if self.drain_requested_at is None:
            return None
        if self.state(now) == "offline":
            return "drained"
        idle = self.metrics.get("accepting") is False and self.metrics.get("work_running") == 0
        return "drained" if idle else "draining"


def agent_liveness(last_seen: float, timeout_seconds: float, interval_seconds: float, *,
                   signs: SignsOfLife | None, conflict_seen_at: float | None, now: float,
                   asleep: bool = False) -> Liveness:
    """An agent's liveness at ``now`` from what the registry stores of it (unix seconds):
    ``online``, ``stopped`` or ``lost`` as
    :func:`~chiffon_worker.orchestrator.liveness.liveness_of` judges its newest heartbeat
    (``last_seen``, its ``timeout_seconds``) and ``signs``; ``conflict`` instead of
    ``online`` while a second process claiming its id was seen within the conflict window
    (``conflict_seen_at``, the agent's heartbeat ``interval_seconds``); ``asleep`` when its
    newest heartbeat announced sleep."""
    state = liveness_of(last_seen, timeout_seconds, signs, now, asleep=asleep)
    if state == "online" and conflict_seen_at is not None and conflict_is_current(
            conflict_seen_at, interval_seconds, now):
        return "conflict"
    return state


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


def _check_sqlite_exists(url: str) -> None:
    """A SQLite registry opened to read must exist (connecting would create the file)."""
    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:") \
            and not Path(database).expanduser().is_file():
        raise RegistryError(f"no registry at {Path(database).expanduser()}: none was written "
                            "there yet (the orchestrator creates it: is `chiffon orchestrator` "
                            "running with this state_dir or database_url?)")


#: Columns an upsert never overwrites in an existing row.
_KEPT_ON_UPDATE = ("first_seen",)


def _updated_columns(table: Table, keys: Sequence[str]) -> list[str]:
    """The columns an upsert of ``table`` (unique on ``keys``) sets in an existing row."""
    return [c.name for c in table.columns if c.name not in keys and c.name not in _KEPT_ON_UPDATE]


class _Upsert(NamedTuple):
    """An upsert as driver SQL, and what takes a row's values in its parameters' order."""

    sql: str
    values: Callable[[Mapping[str, Any]], tuple[Any, ...]]
    columns: tuple[str, ...]  # the parameters' order


def _row_values(order: Sequence[str]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """A row's values in ``order`` as a tuple (KeyError names a missing column)."""
    if len(order) == 1:
        name = order[0]
        return lambda row: (row[name],)
    getter: Callable[[Mapping[str, Any]], tuple[Any, ...]] = operator.itemgetter(*order)
    return getter


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
                 history_points: int = DEFAULT_HISTORY_POINTS, read_only: bool = False
                 ) -> None:
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
        self._upsert_cache: dict[str, _Upsert] = {}
        self._bulk_cache: dict[str, pg_bulk.BulkUpsert] = {}
        self._update_cache: dict[str, _Upsert] = {}
        self._state_sql: str | None = None  # PostgreSQL's read of sequencing state
        self._copy_allowed: bool | None = None  # asked at the first bulk upsert
        self._ranking_cache: dict[tuple[Any, ...], Select[Any]] = {}
        #: opened only to read: nothing is created, migrated or altered
        self.read_only = read_only
        if read_only and backend == "sqlite":
            _check_sqlite_exists(url)
        self._engine = self._create_engine(url, backend)
        try:
            self._check_readable() if read_only else self._migrate()
        except BaseException:
            self._engine.dispose()
            raise

    @classmethod
    def from_config(cls, config: Config, *, read_only: bool = False) -> Registry:
        """The registry at ``config.effective_database_url`` (``read_only``: for the
        commands that only read it; one that does not exist is an error, not made)."""
        return cls(config.effective_database_url, read_only=read_only)

    def _create_engine(self, url: str, backend: str) -> Engine:
        try:
            if backend == "sqlite":
                if not self.read_only:
                    _prepare_sqlite(url)
                engine = create_engine(
                    url, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_SECONDS})
                if not self.read_only:  # WAL is the writer's choice, made when it creates
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
                if self.schema and not conn.execute(
                        text("SELECT 1 FROM pg_namespace WHERE nspname = :name"),
                        {"name": self.schema}).first():
                    # only when missing: PostgreSQL checks the database's CREATE privilege
                    # even for IF NOT EXISTS, which a user owning just its schema lacks
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

    def _check_readable(self) -> None:
        """A registry opened to read must be a chiffon registry of this schema."""
        with self._transaction("open") as conn:
            if not inspect(conn).has_table(sql_schema.schema_version.name,
                                           schema=self.schema):
                raise RegistryError(f"{self.masked_url} is not a chiffon registry (it has no "
                                    f"{sql_schema.schema_version.name} table); check "
                                    "database_url and state_dir")
            current = conn.execute(
                select(func.max(sql_schema.schema_version.c.version))).scalar() or 0
        if current > sql_schema.SCHEMA_VERSION:
            raise RegistryError(
                f"registry {self.masked_url} has schema version {current}, newer than this "
                f"chiffon understands ({sql_schema.SCHEMA_VERSION}); upgrade chiffon")
        if current < sql_schema.SCHEMA_VERSION:
            raise RegistryError(
                f"registry {self.masked_url} has schema version {current}, older than this "
                f"chiffon reads ({sql_schema.SCHEMA_VERSION}); start this version's `chiffon "
                "orchestrator` once (it upgrades the registry in place)")

    def _upgrade(self, conn: Connection, current: int) -> None:
        """Migrate from ``current`` to :data:`sql_schema.SCHEMA_VERSION` in the caller's
        transaction (PostgreSQL: under the advisory lock). Every step so far (2: GPU
        health, power, processes; 3: accepting, accepting_reason, work_running) only adds
        nullable ``agents`` columns, so one step serves any older version: add the missing
        columns."""
        table = sql_schema.agents
        present = {c["name"] for c in inspect(conn).get_columns(table.name,
                                                                schema=self.schema)}
        preparer = conn.dialect.identifier_preparer
        name = sql_schema.qualified_name(table, self.schema, conn.dialect)
        added = sql_schema.missing_agent_columns(present)
        for column in added:
            kind = column.type.compile(dialect=conn.dialect)
            conn.execute(text(f"ALTER TABLE {name} ADD COLUMN "
                              f"{preparer.quote(column.name)} {kind}"))
        conn.execute(insert(sql_schema.schema_version),
                     {"version": sql_schema.SCHEMA_VERSION, "applied_at": time.time()})
        log.info("upgraded registry %s from schema %d to %d (added %s)", self.masked_url,
                 current, sql_schema.SCHEMA_VERSION,
                 ", ".join(c.name for c in added) or "no columns")

    def registry_id(self) -> str:
        """This registry's own id, made once (a UUID's hex)."""
        info = sql_schema.registry_info
        with self._transaction("write") as conn:
            found = conn.execute(select(info.c.registry_id).where(info.c.id == 1)).scalar()
            if found is None:
                self._upsert(conn, info, ("id",), [{"id": 1, "registry_id": uuid.uuid4().hex}])
                found = conn.execute(select(info.c.registry_id).where(info.c.id == 1)).scalar()
        return str(found)

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

    def _upsert_sql(self, table: Table, keys: Sequence[str]) -> _Upsert:
        """The upsert of ``table`` (unique on ``keys``) as driver SQL with positional
        parameters, and what takes a row's values in their order.

        Built with SQLAlchemy Core once per table and run with ``exec_driver_sql``: for
        batches of plain values this skips SQLAlchemy's per-row parameter processing,
        which measured 20-40% of the write time. Positional, not named: sqlite3 binds a
        named parameter by asking SQLite its name and looking it up in the row, which
        measured ~10 µs of the ~40 µs an agent row's upsert costs.
        """
        cached = self._upsert_cache.get(table.name)
        if cached is not None:
            return cached
        dialect_insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        stmt = dialect_insert(table)
        updates = {name: stmt.excluded[name] for name in _updated_columns(table, keys)}
        stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_=updates)
        driver_dialect: Any = type(self._engine.dialect)  # PostgreSQL's driver: format (%s)
        dialect = (driver_dialect(paramstyle="format") if self.dialect == "postgresql"
                   else sqlite.dialect(paramstyle="qmark"))
        schema_map = {None: self.schema} if self.schema else None
        compiled = stmt.compile(dialect=dialect, schema_translate_map=schema_map,
                                render_schema_translate=bool(schema_map))
        order = tuple(compiled.positiontup or ())
        upsert = _Upsert(str(compiled), _row_values(order), order)
        self._upsert_cache[table.name] = upsert
        return upsert

    def _upsert(self, conn: Connection, table: Table, keys: Sequence[str],
                rows: Sequence[Mapping[str, Any]], *, bulk: bool = False) -> None:
        """Insert-or-update ``rows`` (every column of ``table``; unique on ``keys``).

        ``bulk``: on PostgreSQL, :data:`pg_bulk.MIN_ROWS` rows or more go through ``COPY``
        (:mod:`.pg_bulk`; the rows must then be unique on ``keys``, as heartbeat batches
        are)."""
        upsert = self._upsert_sql(table, keys)
        try:
            values = list(map(upsert.values, rows))
        except KeyError as exc:  # a RegistryError (nothing stored), as the driver's would be
            raise InvalidRequestError(f"a {table.name} row has no column {exc}") from None
        if bulk and self.dialect == "postgresql" and len(values) >= pg_bulk.MIN_ROWS \
                and self._may_copy(conn):
            pg_bulk.bulk_upsert(conn, self._bulk_sql(conn, table, keys, upsert), values)
        else:
            conn.exec_driver_sql(upsert.sql, values)

    def _sequencing_rows(self, conn: Connection, ids: Sequence[str]) -> Sequence[Any]:
        """The stored :class:`SequencingState` columns of the agents ``ids`` (those
        stored), read in an ingest turn. On PostgreSQL one array parameter (``= ANY``) as
        driver SQL: the ``IN`` list SQLAlchemy expands, one parameter per id, cost 18.6 ms
        of client CPU per 1,000 agents against 3.8, in the turn every other orchestrator
        waits for when another one wrote last."""
        a = sql_schema.agents
        if self.dialect != "postgresql":
            return conn.execute(select(*(a.c[name] for name in SequencingState._fields))
                                .where(a.c.agent_id.in_(ids))).all()
        if self._state_sql is None:
            preparer = self._engine.dialect.identifier_preparer
            table = sql_schema.qualified_name(a, self.schema, self._engine.dialect)
            columns = ", ".join(preparer.quote(name) for name in SequencingState._fields)
            self._state_sql = (f"SELECT {columns} FROM {table} WHERE "
                               f"{preparer.quote('agent_id')} = ANY(%s::varchar[])")
        return conn.exec_driver_sql(self._state_sql, (list(ids),)).all()

    def _write_agents(self, conn: Connection, rows: Sequence[Mapping[str, Any]],
                      stored: Collection[str]) -> None:
        """Write agent rows: on SQLite the rows of ``stored`` agents by ``UPDATE`` (the
        upsert's insert attempt first cost more: median 19.4 against 16.1 ms per 1,000
        rows of today's heartbeats), the others upserted; where an update found fewer
        rows than it was given (an agent forgotten meanwhile), those rows are upserted as
        well. On PostgreSQL every row is upserted (``COPY`` for large batches)."""
        table = sql_schema.agents
        if self.dialect != "sqlite" or not stored:
            self._upsert(conn, table, ("agent_id",), rows, bulk=True)
            return
        known = [row for row in rows if row["agent_id"] in stored]
        new = [row for row in rows if row["agent_id"] not in stored] if known else rows
        if known:
            change = self._update_sql(table, ("agent_id",))
            try:
                values = list(map(change.values, known))
            except KeyError as exc:
                raise InvalidRequestError(f"a {table.name} row has no column {exc}") from None
            updated = conn.exec_driver_sql(change.sql, values).rowcount
            if updated != len(known):
                log.debug("%d of %d agent rows to update were not there: upserting them",
                          len(known) - updated, len(known))
                new = rows
        if new:
            self._upsert(conn, table, ("agent_id",), new)

    def _update_sql(self, table: Table, keys: Sequence[str]) -> _Upsert:
        """``UPDATE`` of the columns an upsert of ``table`` sets, where ``keys`` match, as
        driver SQL with positional parameters (SQLite's), built once per table."""
        cached = self._update_cache.get(table.name)
        if cached is None:
            stmt = update(table).values(
                {name: bindparam(name) for name in _updated_columns(table, keys)})
            for key in keys:
                stmt = stmt.where(table.c[key] == bindparam(f"key_{key}"))
            compiled = stmt.compile(dialect=sqlite.dialect(paramstyle="qmark"))
            order = tuple(name.removeprefix("key_") for name in compiled.positiontup or ())
            cached = self._update_cache[table.name] = _Upsert(str(compiled),
                                                              _row_values(order), order)
        return cached

    def _may_copy(self, conn: Connection) -> bool:
        """Whether bulk upserts may use a temporary table (asked once; a user without the
        ``TEMPORARY`` privilege is told once, and its batches go row by row)."""
        if self._copy_allowed is None:
            self._copy_allowed = pg_bulk.may_create_temp_tables(conn)
            if not self._copy_allowed:
                log.warning("registry %s: this database user may not create temporary "
                            "tables, so heartbeat batches are written row by row (slower); "
                            "GRANT TEMPORARY ON DATABASE to it to write them with COPY",
                            self.masked_url)
        return self._copy_allowed

    def _bulk_sql(self, conn: Connection, table: Table, keys: Sequence[str], upsert: _Upsert
                  ) -> pg_bulk.BulkUpsert:
        """``table``'s bulk upsert on PostgreSQL, columns as ``upsert``'s: built, and its
        column types read on ``conn``, once."""
        cached = self._bulk_cache.get(table.name)
        if cached is None:
            cached = pg_bulk.bulk_upsert_sql(table, keys, upsert.columns,
                                             _updated_columns(table, keys),
                                             dialect=self._engine.dialect, schema=self.schema)
            cached = cached._replace(types=pg_bulk.column_types(conn, cached))
            self._bulk_cache[table.name] = cached
        return cached

    def write_batch(self, agent_rows: Sequence[Mapping[str, Any]],
                    history_rows: Sequence[Mapping[str, Any]],
                    conflict_rows: Sequence[Mapping[str, Any]] = (),
                    late_rows: Sequence[Mapping[str, Any]] = (), *,
                    stored: Collection[str] = ()) -> None:
        """Upsert agent rows and history points in one transaction.

        ``agent_rows`` hold every column of ``chiffon_agents`` (at most one per agent id;
        an existing row keeps its ``first_seen``); ``history_rows`` every column of
        ``chiffon_history`` (at most one per agent id and slot); ``late_rows`` the
        ``agent_id`` and the columns a late heartbeat changes (``judge.LATE_COLUMNS``) of
        agents without a row in ``agent_rows``. ``stored``: agent ids whose row the
        registry holds already (the judge's memory came from it), which SQLite updates
        in place (see :meth:`_write_agents`).
        """
        if not agent_rows and not history_rows and not conflict_rows and not late_rows:
            return
        with self._transaction("write") as conn:
            self._write_rows(conn, agent_rows, history_rows, conflict_rows, late_rows,
                             stored=stored)

    def _write_rows(self, conn: Connection, agent_rows: Sequence[Mapping[str, Any]],
                    history_rows: Sequence[Mapping[str, Any]],
                    conflict_rows: Sequence[Mapping[str, Any]],
                    late_rows: Sequence[Mapping[str, Any]], *,
                    stored: Collection[str] = ()) -> None:
        if agent_rows:
            self._write_agents(conn, agent_rows, stored)
        if late_rows:
            a = sql_schema.agents
            conn.execute(update(a).where(a.c.agent_id == bindparam("b_agent_id")).values(
                {name: bindparam(f"b_{name}") for name in _LATE_COLUMNS}),
                [{f"b_{key}": value for key, value in row.items()} for row in late_rows])
        if history_rows:
            self._upsert(conn, sql_schema.history, ("agent_id", "slot"), history_rows,
                         bulk=True)
        if conflict_rows:
            self._upsert(conn, sql_schema.conflicts, ("agent_id",), conflict_rows)

    @contextmanager
    def ingest_turn(self, writer: str) -> Iterator[IngestTurn]:
        """A transaction holding the registry's ingest turn (see
        ``sql_schema.ingest_turns``): heartbeat batches of every orchestrator on this
        registry commit one at a time, each reading the agents' state as the one before
        committed it. ``writer`` names the caller (host and pid)."""
        with self._transaction("write heartbeats to") as conn:
            yield IngestTurn(self, conn, self._take_turn(conn, writer))

    def _take_turn(self, conn: Connection, writer: str) -> int:
        """Advance the ingest generation on ``conn`` (locking its row until commit);
        returns the new generation."""
        turns = sql_schema.ingest_turns
        advance = (update(turns).where(turns.c.id == 1)
                   .values(generation=turns.c.generation + 1, writer=writer)
                   .returning(turns.c.generation))
        generation = conn.execute(advance).scalar()
        if generation is None:  # the first turn: make the row (another writer may too)
            dialect_insert = (postgresql.insert if self.dialect == "postgresql"
                              else sqlite.insert)
            conn.execute(dialect_insert(turns).values(id=1, generation=0, writer=writer)
                         .on_conflict_do_nothing(index_elements=["id"]))
            generation = conn.execute(advance).scalar()
        return int(generation or 0)

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
        """Remove an agent and its history; returns whether it was known. Takes the ingest
        turn, so orchestrators drop what they remember of the agent."""
        with self._transaction("write") as conn:
            self._take_turn(conn, "forget")
            conn.execute(delete(sql_schema.history)
                         .where(sql_schema.history.c.agent_id == agent_id))
            conn.execute(delete(sql_schema.signs_of_life)
                         .where(sql_schema.signs_of_life.c.agent_id == agent_id))
            conn.execute(delete(sql_schema.conflicts)
                         .where(sql_schema.conflicts.c.agent_id == agent_id))
            conn.execute(delete(sql_schema.drains)
                         .where(sql_schema.drains.c.agent_id == agent_id))
            conn.execute(delete(sql_schema.reservations)
                         .where(sql_schema.reservations.c.agent_id == agent_id))
            result = conn.execute(delete(sql_schema.agents)
                                  .where(sql_schema.agents.c.agent_id == agent_id))
        return bool(result.rowcount)

    def drain(self, agent_id: str, by: str, *, now: float | None = None) -> float:
        """Record that ``by`` (an operator, ``user@host``) drained ``agent_id`` at ``now``
        (unix seconds, default the current time); a second drain keeps the first request.
        Returns the request's time."""
        table = sql_schema.drains
        dialect_insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        at = time.time() if now is None else now
        with self._transaction("write") as conn:
            conn.execute(dialect_insert(table)
                         .values(agent_id=agent_id, requested_at=at, requested_by=by)
                         .on_conflict_do_nothing(index_elements=["agent_id"]))
            stored = conn.execute(select(table.c.requested_at)
                                  .where(table.c.agent_id == agent_id)).scalar_one()
        return float(stored)

    def undrain(self, agent_id: str) -> bool:
        """Delete ``agent_id``'s drain request; returns whether there was one."""
        with self._transaction("write") as conn:
            result = conn.execute(delete(sql_schema.drains)
                                  .where(sql_schema.drains.c.agent_id == agent_id))
        return bool(result.rowcount)

    # -- reads ----------------------------------------------------------------------------

    def agents(self, pool: str | None = None, *, with_snapshot: bool = False
               ) -> list[AgentRecord]:
        """Every agent (of ``pool``), ordered by pool then agent id."""
        reader, rows = self._agent_rows(pool, with_snapshot)
        return [reader.record(row) for row in rows]

    def agents_with_snapshot_text(self, pool: str | None = None
                                  ) -> list[tuple[AgentRecord, str]]:
        """Every agent (of ``pool``), ordered by pool then agent id, each with its newest
        snapshot's JSON text as stored (empty: none), not decoded: the record's
        ``snapshot`` is empty. For readers that copy the text (``chiffon status --json``):
        decoding 10,000 snapshots took longer than reading them."""
        reader, rows = self._agent_rows(pool, True)
        return [(reader.record(row, decode_snapshot=False), reader.snapshot_text(row))
                for row in rows]

    def agent_values(self, columns: Sequence[str], now: float
                     ) -> list[tuple[Liveness, Sequence[Any]]]:
        """Every agent's liveness at ``now`` (unix seconds; as :meth:`AgentRecord.liveness`)
        and a row whose first values are its ``columns`` of ``chiffon_agents``, in that
        order; by pool then agent id. Reads those columns and what liveness needs (signs
        of life, conflict), builds no record: for ``/metrics``, where building 10,000
        records took longer than the SQL."""
        a, signs, conflicts = sql_schema.agents, sql_schema.signs_of_life, sql_schema.conflicts
        query = select(
            *(a.c[name] for name in columns), a.c.last_seen.label("liveness_last_seen"),
            a.c.heartbeat_timeout_seconds.label("liveness_timeout"),
            a.c.heartbeat_interval_seconds.label("liveness_interval"),
            a.c.asleep.label("liveness_asleep"),
            *(signs.c[name] for name in _SIGN_COLUMNS),
            conflicts.c.seen_at.label("conflict_seen_at")).select_from(
            a.outerjoin(signs, signs.c.agent_id == a.c.agent_id)
            .outerjoin(conflicts, conflicts.c.agent_id == a.c.agent_id)
        ).order_by(a.c.pool, a.c.agent_id)
        with self._transaction("read") as conn:
            rows = conn.execute(query).all()
        at = len(columns)
        values: list[tuple[Liveness, Sequence[Any]]] = []
        for row in rows:
            last_seen, timeout, interval, asleep, worker, last_event, event_interval, \
                offline, seen_at = row[at:]
            sign = None if last_event is None else SignsOfLife(
                worker_name=worker, last_event_at=last_event,
                event_interval_seconds=event_interval, offline_at=offline)
            values.append((agent_liveness(last_seen, timeout, interval, signs=sign,
                                          conflict_seen_at=seen_at, now=now,
                                          asleep=asleep is True), row))
        return values

    def _agent_rows(self, pool: str | None, with_snapshot: bool
                    ) -> tuple[_RecordReader, Sequence[Sequence[Any]]]:
        """The rows of :func:`_agents_query` (of ``pool``, by pool then agent id) as
        tuples, and the reader of their layout."""
        query = _agents_query(with_snapshot).order_by(sql_schema.agents.c.pool,
                                                     sql_schema.agents.c.agent_id)
        if pool is not None:
            query = query.where(sql_schema.agents.c.pool == pool)
        with self._transaction("read") as conn:
            result = conn.execute(query)
            keys = tuple(result.keys())
            rows = result.all()
        return _reader(keys), rows

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

    def history_since(self, since: float) -> dict[str, list[HistoryPoint]]:
        """Every agent's stored points received at or after ``since`` (unix s), oldest
        first, by agent id: one query for the whole fleet (the fleet page's sparklines;
        :meth:`history` once per agent took 3 s at 1,000 agents with full rings, this
        0.4 s)."""
        h = sql_schema.history
        query = (select(h.c.agent_id, h.c.received_at, *(h.c[name] for name in HISTORY_NAMES))
                 .where(h.c.received_at >= since, h.c.slot < self.history_points))
        with self._transaction("read") as conn:
            rows = conn.execute(query).all()
        found: dict[str, list[HistoryPoint]] = {}
        for row in rows:
            found.setdefault(row[0], []).append(
                HistoryPoint(row[1], dict(zip(HISTORY_NAMES, row[2:], strict=True))))
        for points in found.values():  # sorted here: half the time of ORDER BY in SQLite
            points.sort(key=_RECEIVED_AT)
        return found


    # -- placements and work ---------------------------------------------------------------

    @contextmanager
    def placement(self) -> Iterator[Connection]:
        """A transaction holding the placement lock: read, choose and reserve in it, and no
        other placement (thread, process or host) runs until it commits. The lock is an
        update of the one row of ``chiffon_placement_lock`` (a row lock on PostgreSQL, the
        database's write lock on SQLite)."""
        lock = sql_schema.placement_lock
        with self._transaction("place work") as conn:
            taken = conn.execute(update(lock).where(lock.c.id == 1)
                                 .values(placements=lock.c.placements + 1)).rowcount
            if not taken:
                self._upsert(conn, lock, ("id",), [{"id": 1, "placements": 1}])
                conn.execute(update(lock).where(lock.c.id == 1)
                             .values(placements=lock.c.placements + 1))
            yield conn

    def agents_on(self, conn: Connection, pool: str | None) -> list[AgentRecord]:
        """Every agent (of ``pool``) read on ``conn`` (without snapshots)."""
        query = _agents_query(False).order_by(sql_schema.agents.c.agent_id)
        if pool is not None:
            query = query.where(sql_schema.agents.c.pool == pool)
        return [_record(row) for row in conn.execute(query).mappings().all()]

    def candidates(self, conn: Connection, *, pool: str | None, now: float,
                   needs: Mapping[str, tuple[str, str, float]], not_false: Sequence[str],
                   default_rank: str) -> Iterator[tuple[AgentRecord, list[Reservation]]]:
        """Agents that may take work, best first, read a page at a time on ``conn``, each
        with its reservations active at ``now`` (unix s).

        ``needs``: need key (a reservation column) -> (the agent column holding what is
        free of it, the one holding its whole capacity, the amount asked, > 0). What an
        agent can be promised of each, ``min(free - unreflected, total - promised)`` (see
        :mod:`.reservations`), is computed in SQL from its active reservations, so the
        agents come ranked by it: by the smallest ``promisable / amount`` descending (no
        need: ``default_rank`` descending), then agent id. Only agents whose capacity
        heartbeat is younger than their timeout, of ``pool``, with every need promisable
        and no column of ``not_false`` false are listed; liveness, drains and conflicts
        are the caller's to check on the records."""
        a = sql_schema.agents
        shape = (pool is not None, tuple((k, f, t) for k, (f, t, _) in needs.items()),
                 tuple(not_false), default_rank)
        query = self._ranking_cache.get(shape)
        if query is None:
            query = self._ranking_query(*shape)
            self._ranking_cache[shape] = query
        params: dict[str, Any] = {"now": now, "pool": pool}
        params.update({f"amount_{k}": amount for k, (_, _, amount) in needs.items()})
        if self.dialect == "postgresql" and needs:
            # A fresh reservations table has no statistics: the planner takes ``held`` for
            # one row and joins it to every agent in a nested loop (measured 166 ms at
            # 10,000 agents and 185 holders, against 8 ms hashed).
            conn.execute(text("SET LOCAL enable_nestloop = off"))
        offset, page = 0, _FIRST_CANDIDATES
        while True:
            ids = [row[0] for row in conn.execute(query.limit(page).offset(offset), params)]
            if not ids:
                return
            rows = conn.execute(_agents_query(False).where(a.c.agent_id.in_(ids))
                                ).mappings().all()
            by_id = {row["agent_id"]: row for row in rows}
            holding: dict[str, list[Reservation]] = {}
            for reservation in self._active_reservations(conn, now, ids):
                holding.setdefault(reservation.agent_id, []).append(reservation)
            for agent_id in ids:
                if agent_id in by_id:
                    yield _record(by_id[agent_id]), holding.get(agent_id, [])
            if len(ids) < page:
                return
            offset, page = offset + page, _CANDIDATE_BATCH

    def _ranking_query(self, by_pool: bool, needs: tuple[tuple[str, str, str], ...],
                       not_false: tuple[str, ...], default_rank: str) -> Select[Any]:
        """The ranked agent ids of :meth:`candidates`, built once per shape, with bound
        parameters ``now``, ``pool`` and ``amount_<need key>``."""
        a, r = sql_schema.agents, sql_schema.reservations
        least = func.least if self.dialect == "postgresql" else func.min
        now = bindparam("now", type_=Float)
        held = None
        if needs:
            owner = sql_schema.agents.alias("owner")
            reflected = (r.c.started_at.is_not(None)
                         & (owner.c.collected_at >= r.c.started_at
                            + owner.c.heartbeat_interval_seconds))
            sums = []
            for key, _, _ in needs:
                sums.append(func.sum(r.c[key]).label(f"promised_{key}"))
                sums.append(func.sum(case((reflected, 0.0), else_=r.c[key]))
                            .label(f"unreflected_{key}"))
            held = (select(r.c.agent_id, *sums)
                    .join(owner, owner.c.agent_id == r.c.agent_id)
                    .where(r.c.state.in_(ACTIVE_STATES), r.c.ended_at.is_(None),
                           r.c.expires_at > now)
                    .group_by(r.c.agent_id).subquery("held"))
        source: Any = a if held is None else a.outerjoin(held, held.c.agent_id == a.c.agent_id)
        query = select(a.c.agent_id).select_from(source).where(
            a.c.last_seen + a.c.heartbeat_timeout_seconds >= now)
        if by_pool:
            query = query.where(a.c.pool == bindparam("pool", type_=String))
        for name in not_false:
            query = query.where(a.c[name].is_(None) | a.c[name].is_(True))
        ratios: list[Any] = []
        for key, free, total in needs:
            assert held is not None
            amount = bindparam(f"amount_{key}", type_=Float)
            promisable = least(
                a.c[free] - func.coalesce(held.c[f"unreflected_{key}"], 0.0),
                a.c[total] - func.coalesce(held.c[f"promised_{key}"], 0.0))
            query = query.where(promisable >= amount)
            ratios.append(promisable / amount)
        rank: Any = a.c[default_rank] if not ratios else (
            ratios[0] if len(ratios) == 1 else least(*ratios))
        return query.order_by(rank.desc(), a.c.agent_id)

    def active_reservations(self, conn: Connection, now: float) -> list[Reservation]:
        """Reservations still holding capacity at ``now`` (unix s), read on ``conn``."""
        return self._active_reservations(conn, now, None)

    def _active_reservations(self, conn: Connection, now: float,
                             agent_ids: Sequence[str] | None) -> list[Reservation]:
        r = sql_schema.reservations
        query = select(r).where(r.c.state.in_(ACTIVE_STATES), r.c.ended_at.is_(None),
                                r.c.expires_at > now)
        if agent_ids is not None:
            query = query.where(r.c.agent_id.in_(agent_ids))
        return [_reservation(row) for row in conn.execute(query).mappings().all()]

    def work_known(self, conn: Connection, work_id: str) -> bool:
        """Whether ``work_id`` was placed or seen before (read on ``conn``)."""
        r = sql_schema.reservations
        return conn.execute(select(r.c.work_id).where(r.c.work_id == work_id)).first() \
            is not None

    def reserve(self, conn: Connection, reservation: Reservation) -> None:
        """Store ``reservation`` on ``conn`` (inside :meth:`placement`)."""
        conn.execute(insert(sql_schema.reservations), _reservation_row(reservation))

    def work(self, *, ended_since: float | None = None) -> list[Reservation]:
        """Placed and running work, oldest first; with ``ended_since`` (unix s) also work
        that ended (or expired) after it."""
        r = sql_schema.reservations
        query = select(r).order_by(r.c.placed_at, r.c.work_id)
        if ended_since is None:
            query = query.where(r.c.state.in_(ACTIVE_STATES), r.c.ended_at.is_(None))
        else:
            query = query.where((r.c.ended_at.is_(None)) | (r.c.ended_at >= ended_since))
        with self._transaction("read") as conn:
            rows = conn.execute(query).mappings().all()
        return [_reservation(row) for row in rows]

    def end_work(self, work_id: str, state: WorkState, at: float) -> bool:
        """Mark work ended (``state``, at ``at`` unix s) if it still holds capacity;
        returns whether it did."""
        r = sql_schema.reservations
        with self._transaction("write") as conn:
            done = conn.execute(update(r).where(r.c.work_id == work_id,
                                                r.c.state.in_(ACTIVE_STATES))
                                .values(state=state, ended_at=at)).rowcount
        return bool(done)

    def cancel_reservation(self, work_id: str) -> None:
        """Forget a reservation whose work was never sent (its publish failed)."""
        r = sql_schema.reservations
        with self._transaction("write") as conn:
            conn.execute(delete(r).where(r.c.work_id == work_id))

    def record_work_events(self, events: Sequence[WorkEvent]) -> None:
        """Apply the agents' task events, in order: a start marks work ``running``, an end
        ends it; work placed through a pool (no reservation yet) gets a row holding
        nothing, so ``chiffon work`` shows it too."""
        if not events:
            return
        r = sql_schema.reservations
        with self._transaction("write") as conn:
            for event in events:
                known = conn.execute(select(r.c.state).where(r.c.work_id == event.work_id)
                                     ).first()
                if known is None:
                    if event.state not in ACTIVE_STATES:
                        continue  # the end of work this registry never saw: nothing held
                    conn.execute(insert(r), _reservation_row(Reservation(
                        work_id=event.work_id, agent_id=event.agent_id, pool="",
                        work_type="", needs={}, state=event.state, placed_at=event.at,
                        expires_at=event.at + _SEEN_WORK_TTL_SECONDS, submitter="",
                        started_at=event.at if event.state == "running" else None)))
                elif known.state in ACTIVE_STATES:
                    values: dict[str, Any] = {"state": event.state}
                    if event.state == "running":
                        values["started_at"] = event.at
                    elif event.state not in ACTIVE_STATES:
                        values["ended_at"] = event.at
                    conn.execute(update(r).where(r.c.work_id == event.work_id).values(values))

    def purge_work(self, before: float) -> int:
        """Delete work that ended, or whose reservation expired, before ``before`` (unix s);
        returns rows deleted."""
        r = sql_schema.reservations
        with self._transaction("write") as conn:
            result = conn.execute(delete(r).where(
                (r.c.ended_at < before) | (r.c.ended_at.is_(None) & (r.c.expires_at < before))))
        return int(result.rowcount or 0)


#: Candidate agents read first while placing: the ranking already holds only agents with
#: room, so the first nearly always takes the work and reading 64 records (each a row of
#: ~60 columns made into an AgentRecord) was most of a placement's own time.
_FIRST_CANDIDATES = 4
#: Candidate agents read at a time after the first page.
_CANDIDATE_BATCH = 64
#: How long work seen only through task events (no placement) is listed as active when
#: its end is never seen (seconds).
_SEEN_WORK_TTL_SECONDS = 86400.0


#: The columns a late heartbeat updates (``judge.LATE_COLUMNS``, which is checked against
#: this in the tests: the registry does not import the judge).
_LATE_COLUMNS = ("missed", "missed_seqs", "history_count")


class SequencingState(NamedTuple):
    """What the judge keeps of an agent between heartbeats, as stored (times are unix
    seconds; the same names as :class:`AgentRecord`'s)."""

    agent_id: str
    hostname: str
    first_seen: float
    last_seen: float
    boot_id: str
    started_at: float
    seq: int
    restarts: int
    missed: int
    missed_seqs: tuple[int, ...]
    past_boot_ids: tuple[str, ...]
    history_count: int
    clock_skew_seconds: float | None
    heartbeat_interval_seconds: float

    @classmethod
    def of_row(cls, row: Sequence[Any]) -> SequencingState:
        """The state of a stored row (values in field order, the JSON list columns as
        stored: decoded here)."""
        values = list(row)
        missed, past = values[_MISSED_SEQS_AT], values[_PAST_BOOT_IDS_AT]
        values[_MISSED_SEQS_AT] = () if missed in (None, "[]") else tuple(json.loads(missed))
        values[_PAST_BOOT_IDS_AT] = () if past == "[]" else tuple(json.loads(past))
        return cls._make(values)


_MISSED_SEQS_AT = SequencingState._fields.index("missed_seqs")
_PAST_BOOT_IDS_AT = SequencingState._fields.index("past_boot_ids")


class IngestTurn:
    """The ingest turn of one heartbeat batch (:meth:`Registry.ingest_turn`): read the
    agents' state and write the batch's rows on its transaction."""

    def __init__(self, registry: Registry, conn: Connection, generation: int) -> None:
        self._registry = registry
        self._conn = conn
        #: the registry's ingest generation after this turn (one per batch or forget)
        self.generation = generation

    def agents(self, agent_ids: Iterable[str]) -> list[SequencingState]:
        """What sequencing needs of those of ``agent_ids`` known (one table, no joins: read
        while every other orchestrator waits for the turn)."""
        ids = sorted(set(agent_ids))
        if not ids:
            return []
        return [SequencingState.of_row(row)
                for row in self._registry._sequencing_rows(self._conn, ids)]

    def write(self, agent_rows: Sequence[Mapping[str, Any]],
              history_rows: Sequence[Mapping[str, Any]],
              conflict_rows: Sequence[Mapping[str, Any]] = (),
              late_rows: Sequence[Mapping[str, Any]] = (), *,
              stored: Collection[str] = ()) -> None:
        """Write rows as :meth:`Registry.write_batch` does, in this turn."""
        self._registry._write_rows(self._conn, agent_rows, history_rows, conflict_rows,
                                   late_rows, stored=stored)


@dataclass(frozen=True)
class WorkEvent:
    """What an agent's task event says about one piece of work: its new state, when
    (receipt time, unix s) and on which agent."""

    work_id: str
    agent_id: str
    state: WorkState
    at: float


def _reservation(row: RowMapping) -> Reservation:
    values = dict(row)
    needs = {key: float(values.pop(key)) for key in sql_schema.NEED_KEYS}
    return Reservation(needs={k: v for k, v in needs.items() if v}, **values)


def _reservation_row(reservation: Reservation) -> dict[str, Any]:
    row: dict[str, Any] = {
        "work_id": reservation.work_id, "agent_id": reservation.agent_id,
        "pool": reservation.pool, "work_type": reservation.work_type,
        "state": reservation.state, "placed_at": reservation.placed_at,
        "expires_at": reservation.expires_at, "started_at": reservation.started_at,
        "ended_at": reservation.ended_at, "submitter": reservation.submitter}
    for key in sql_schema.NEED_KEYS:
        row[key] = float(reservation.needs.get(key, 0.0))
    return row

_SIGN_COLUMNS = ("worker_name", "last_event_at", "event_interval_seconds", "offline_at")
#: Columns of ``chiffon_conflicts`` as read into records (prefixed: ``hostname`` clashes).
_CONFLICT_COLUMNS = {"conflict_hostname": "hostname", "conflict_boot_id": "boot_id",
                     "conflict_seen_at": "seen_at"}


def _agents_query(with_snapshot: bool) -> Select[Any]:
    """Agent rows with their signs of life, conflict and drain request (outer joins: an
    agent may have none of them)."""
    agents, signs, conflicts = sql_schema.agents, sql_schema.signs_of_life, sql_schema.conflicts
    drains = sql_schema.drains
    columns = [c for c in agents.columns if with_snapshot or c.name != "snapshot"]
    return select(*columns, *(signs.c[name] for name in _SIGN_COLUMNS),
                  *(conflicts.c[name].label(label)
                    for label, name in _CONFLICT_COLUMNS.items()),
                  drains.c.requested_at.label("drain_requested_at")).select_from(
        agents.outerjoin(signs, signs.c.agent_id == agents.c.agent_id)
        .outerjoin(conflicts, conflicts.c.agent_id == agents.c.agent_id)
        .outerjoin(drains, drains.c.agent_id == agents.c.agent_id))


def _record(row: RowMapping) -> AgentRecord:
    """The record of one row of :func:`_agents_query` (as a mapping)."""
    return _reader(tuple(row.keys())).record(tuple(row.values()))


#: Columns of ``chiffon_agents`` read into ``AgentRecord.metrics``.
_METRIC_COLUMNS: tuple[str, ...] = tuple(f.name for f in STORED_METRICS)
#: Readers by the column names of the rows they read (a few query shapes at most).
_READERS: dict[tuple[str, ...], _RecordReader] = {}


def _reader(keys: tuple[str, ...]) -> _RecordReader:
    """The reader of rows with the columns ``keys`` (made once per layout)."""
    reader = _READERS.get(keys)
    if reader is None:
        reader = _READERS[keys] = _RecordReader(keys)
    return reader


class _RecordReader:
    """Makes records from rows of :func:`_agents_query` given as tuples in one column
    layout: each column's position is looked up once, not per row (10,000 rows read
    through ``dict(row)`` and pops took about twice as long)."""

    def __init__(self, keys: Sequence[str]) -> None:
        index = {key: i for i, key in enumerate(keys)}
        apart = {*_SIGN_COLUMNS, *_CONFLICT_COLUMNS, *_METRIC_COLUMNS, "past_boot_ids",
                 "missed_seqs", "snapshot"}
        self.fields = tuple((key, i) for key, i in index.items() if key not in apart)
        self.metrics = tuple((key, index[key]) for key in _METRIC_COLUMNS)
        self.signs = tuple((key, index[key]) for key in _SIGN_COLUMNS)
        self.last_event_at = index["last_event_at"]
        self.conflict = tuple((name, index[label]) for label, name in _CONFLICT_COLUMNS.items())
        self.conflict_seen_at = index["conflict_seen_at"]
        self.past_boot_ids = index["past_boot_ids"]
        self.missed_seqs = index["missed_seqs"]
        self.snapshot = index.get("snapshot")

    def record(self, row: Sequence[Any], *, decode_snapshot: bool = True) -> AgentRecord:
        """The record of ``row``; its ``snapshot`` decoded if the row has one and
        ``decode_snapshot``, else empty."""
        values: dict[str, Any] = {key: row[i] for key, i in self.fields}
        values["metrics"] = {key: row[i] for key, i in self.metrics}
        if row[self.last_event_at] is not None:
            values["signs"] = SignsOfLife(**{key: row[i] for key, i in self.signs})
        if row[self.conflict_seen_at] is not None:
            values["conflict"] = Conflict(**{key: row[i] for key, i in self.conflict})
        past = row[self.past_boot_ids]
        values["past_boot_ids"] = () if past == "[]" else tuple(json.loads(past))
        missed_seqs = row[self.missed_seqs]
        values["missed_seqs"] = () if missed_seqs in (None, "[]") else tuple(
            json.loads(missed_seqs))
        if decode_snapshot:
            text = self.snapshot_text(row)
            values["snapshot"] = json.loads(text) if text else {}
        return AgentRecord(**values)

    def snapshot_text(self, row: Sequence[Any]) -> str:
        """The snapshot's JSON text in ``row`` as stored (empty: none, or not read)."""
        return (row[self.snapshot] or "") if self.snapshot is not None else ""
