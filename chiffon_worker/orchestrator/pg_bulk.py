"""Bulk upserts on PostgreSQL: ``COPY`` into a temporary table, then one
``INSERT … SELECT … ON CONFLICT DO UPDATE``.

psycopg's pipelined ``executemany`` sends one Bind/Execute per row and adapts every row's
values in Python: for the ~60 columns of an agent row that measured 55-80 µs of client
CPU per heartbeat, the largest part of ingest on PostgreSQL. ``COPY`` writes rows through
psycopg's C row formatter and the server inserts them as one statement: 18-23 µs of
client CPU per row, and about half the wall time, storing the same rows. In the binary
format (each column's type given to psycopg, read once from the table's catalog entry by
:func:`column_types`) the formatter writes numbers as they are instead of as text: 3.4
against 11.5 ms of client CPU per 1,000 agent rows of today's heartbeats.

The temporary table (``pg_temp.chiffon_incoming_<table>``, the target's columns, ``ON
COMMIT DELETE ROWS``) belongs to the database session; it is created when missing at each
batch, so a pooled connection that lands on another server session still finds one. The
rows of one call must be unique on the table's key (an ``ON CONFLICT`` statement cannot
touch a row twice); heartbeat batches are (one row per agent, per agent and slot).
A driver error is raised as SQLAlchemy's ``DBAPIError`` wrapping it, as for any
statement, so the registry reports it and rolls the transaction back. A database user
without the ``TEMPORARY`` privilege (:func:`may_create_temp_tables`) is left to
``executemany``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from sqlalchemy import Connection, Table, column, select, table
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, InvalidRequestError

from chiffon_worker.orchestrator import sql_schema

#: Fewer rows than this go through ``executemany`` (COPY's three statements cost more).
MIN_ROWS = 50
_TEMP_SCHEMA = "pg_temp"


class BulkUpsert(NamedTuple):
    """The statements of one table's bulk upsert (driver SQL)."""

    create: str  # the session's temporary table, when missing
    copy: str  # COPY … FROM STDIN (binary) into it, columns in ``columns`` order
    insert: str  # its rows into the table, updating those already there
    columns: tuple[str, ...]
    target: str  # the table, qualified and quoted
    #: the type oid of each of ``columns`` (:func:`column_types`; empty until read)
    types: tuple[int, ...] = ()


def bulk_upsert_sql(target: Table, keys: Sequence[str], columns: Sequence[str],
                    updated: Sequence[str], *, dialect: Dialect, schema: str | None
                    ) -> BulkUpsert:
    """The bulk upsert of ``target`` (unique on ``keys``), rows given as values in
    ``columns`` order; an existing row gets its ``updated`` columns set. ``schema``: the
    registry's schema (None: the search path's)."""
    preparer = dialect.identifier_preparer
    qualified = sql_schema.qualified_name(target, schema, dialect)
    temp_name = f"chiffon_incoming_{target.name}"
    temp = table(temp_name, *(column(name) for name in columns), schema=_TEMP_SCHEMA)
    stmt = postgresql.insert(target).from_select(list(columns),
                                                 select(*(temp.c[n] for n in columns)))
    stmt = stmt.on_conflict_do_update(
        index_elements=list(keys),
        set_={name: stmt.excluded[name] for name in updated})
    schema_map = {None: schema} if schema else None
    insert = str(stmt.compile(dialect=dialect, schema_translate_map=schema_map,
                              render_schema_translate=bool(schema_map)))
    quoted_temp = f"{_TEMP_SCHEMA}.{preparer.quote(temp_name)}"
    names = ", ".join(preparer.quote(name) for name in columns)
    return BulkUpsert(
        create=f"CREATE TEMPORARY TABLE IF NOT EXISTS {preparer.quote(temp_name)} "
               f"(LIKE {qualified}) ON COMMIT DELETE ROWS",
        copy=f"COPY {quoted_temp} ({names}) FROM STDIN (FORMAT BINARY)",
        insert=insert, columns=tuple(columns), target=qualified)


def column_types(conn: Connection, bulk: BulkUpsert) -> tuple[int, ...]:
    """The type oid of each of ``bulk.columns`` in the target table (the temporary table
    has the same: ``LIKE`` it), for the binary ``COPY``."""
    found: dict[str, int] = {str(name): int(oid) for name, oid in conn.exec_driver_sql(
        "SELECT attname, atttypid::int FROM pg_attribute WHERE attrelid = "
        "%(table)s::regclass AND attnum > 0 AND NOT attisdropped",
        {"table": bulk.target}).all()}
    missing = [name for name in bulk.columns if name not in found]
    if missing:  # reported as a failed statement, as the COPY itself would be
        raise InvalidRequestError(f"{bulk.target} has no column {', '.join(missing)}")
    return tuple(found[name] for name in bulk.columns)


def may_create_temp_tables(conn: Connection) -> bool:
    """Whether ``conn``'s user may create temporary tables in its database."""
    allowed = conn.exec_driver_sql(
        "SELECT has_database_privilege(current_database(), 'TEMPORARY')").scalar()
    return bool(allowed)


def bulk_upsert(conn: Connection, bulk: BulkUpsert, rows: Iterable[Sequence[Any]]) -> None:
    """Upsert ``rows`` (values in ``bulk.columns`` order) in ``conn``'s transaction
    (``bulk.types`` read: :func:`column_types`)."""
    import psycopg  # the PostgreSQL driver: only a registry on PostgreSQL needs it

    driver: Any = conn.connection.driver_connection
    statement = bulk.create
    try:
        with driver.cursor() as cursor:
            cursor.execute(bulk.create)
            statement = bulk.copy
            with cursor.copy(bulk.copy) as copy:
                copy.set_types(list(bulk.types))
                _copy_rows(copy, bulk, rows)
            statement = bulk.insert
            cursor.execute(bulk.insert)
    except psycopg.Error as exc:
        raise DBAPIError.instance(statement, None, exc, psycopg.Error) from exc


#: Type oids whose binary dumpers take what the server's text input would refuse: an
#: ``integer`` is written modulo 2**32 (2**31 arrives as -2**31), a ``boolean`` is any
#: value's truth ("f" arrives true). Their values are checked before they are written.
_INT4_OID, _BOOL_OID = 23, 16
_INT4_LIMIT = 1 << 31


def _copy_rows(copy: Any, bulk: BulkUpsert, rows: Iterable[Sequence[Any]]) -> None:
    """Write ``rows`` to the binary ``copy``; a value its column cannot hold (an
    ``integer`` out of range, a ``boolean`` that is not a bool, a type the column's dumper
    refuses) is an InvalidRequestError naming the column, as the server's refusal of the
    same row in text would be (so nothing of the batch is stored)."""
    ints = [(i, bulk.columns[i]) for i, oid in enumerate(bulk.types) if oid == _INT4_OID]
    flags = [(i, bulk.columns[i]) for i, oid in enumerate(bulk.types) if oid == _BOOL_OID]
    write = copy.write_row
    try:
        for row in rows:
            for i, name in ints:
                value = row[i]
                if value is not None and not -_INT4_LIMIT <= value < _INT4_LIMIT:
                    raise InvalidRequestError(f"{bulk.target}.{name}: {value!r} is out of "
                                              "range for type integer")
            for i, name in flags:
                value = row[i]
                if value is not None and value.__class__ is not bool:
                    raise InvalidRequestError(f"{bulk.target}.{name}: {value!r} is not a "
                                              "boolean")
            write(row)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequestError(f"a {bulk.target} row cannot be written: {exc}") from None
