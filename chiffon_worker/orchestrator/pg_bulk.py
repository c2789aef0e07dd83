"""Bulk upserts on PostgreSQL: ``COPY`` into a temporary table, then one
``INSERT … SELECT … ON CONFLICT DO UPDATE``.

psycopg's pipelined ``executemany`` sends one Bind/Execute per row and adapts every row's
values in Python: for the ~60 columns of an agent row that measured 55-80 µs of client
CPU per heartbeat, the largest part of ingest on PostgreSQL. ``COPY`` writes rows through
psycopg's C row formatter and the server inserts them as one statement: 18-23 µs of
client CPU per row, and about half the wall time, storing the same rows.

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
from sqlalchemy.exc import DBAPIError

#: Fewer rows than this go through ``executemany`` (COPY's three statements cost more).
MIN_ROWS = 50
_TEMP_SCHEMA = "pg_temp"


class BulkUpsert(NamedTuple):
    """The statements of one table's bulk upsert (driver SQL)."""

    create: str  # the session's temporary table, when missing
    copy: str  # COPY … FROM STDIN into it, columns in ``columns`` order
    insert: str  # its rows into the table, updating those already there
    columns: tuple[str, ...]


def bulk_upsert_sql(target: Table, keys: Sequence[str], columns: Sequence[str],
                    updated: Sequence[str], *, dialect: Dialect, schema: str | None
                    ) -> BulkUpsert:
    """The bulk upsert of ``target`` (unique on ``keys``), rows given as values in
    ``columns`` order; an existing row gets its ``updated`` columns set. ``schema``: the
    registry's schema (None: the search path's)."""
    preparer = dialect.identifier_preparer
    qualified = (f"{preparer.quote_schema(schema)}." if schema else "") + \
        preparer.quote(target.name)
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
        copy=f"COPY {quoted_temp} ({names}) FROM STDIN",
        insert=insert, columns=tuple(columns))


def may_create_temp_tables(conn: Connection) -> bool:
    """Whether ``conn``'s user may create temporary tables in its database."""
    allowed = conn.exec_driver_sql(
        "SELECT has_database_privilege(current_database(), 'TEMPORARY')").scalar()
    return bool(allowed)


def bulk_upsert(conn: Connection, bulk: BulkUpsert, rows: Iterable[Sequence[Any]]) -> None:
    """Upsert ``rows`` (values in ``bulk.columns`` order) in ``conn``'s transaction."""
    import psycopg  # the PostgreSQL driver: only a registry on PostgreSQL needs it

    driver: Any = conn.connection.driver_connection
    statement = bulk.create
    try:
        with driver.cursor() as cursor:
            cursor.execute(bulk.create)
            statement = bulk.copy
            with cursor.copy(bulk.copy) as copy:
                for row in rows:
                    copy.write_row(row)
            statement = bulk.insert
            cursor.execute(bulk.insert)
    except psycopg.Error as exc:
        raise DBAPIError.instance(statement, None, exc, psycopg.Error) from exc
