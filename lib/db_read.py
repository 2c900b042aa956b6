"""Reads of the pipeline's tables: the current rows, previews, the table as a run left it, one
country's versions, counts and listings; and the CSV export (COPY TO STDOUT)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from psycopg2 import sql

from lib import names
from lib.contract import COLUMNS, KEY, LIST_COLUMNS, TEXT_COLUMNS
from lib.db import LOADS_TABLE, column_list, ident, table_exists
from lib.db_schema import HISTORY_COLUMNS, as_migrated, changes_table, history_table

if TYPE_CHECKING:  # pandas and SQLAlchemy are imported where they are used: exports and counts need neither
    import pandas as pd
    import sqlalchemy as sa

# Text and list columns read back as Python objects: pandas 3 would infer a string dtype, NaN for NULL.
OBJECT_COLUMNS = (*LIST_COLUMNS, *TEXT_COLUMNS)


def _select_contract(schema: str, table: str, where: sql.Composable = sql.SQL("")) -> sql.Composed:
    return sql.SQL("SELECT {cols}, _row_hash, _run_id, _loaded_at FROM {t} {where} ORDER BY {k}").format(
        cols=column_list(COLUMNS), t=ident(schema, table), where=where, k=sql.Identifier(KEY))


def read_frame(conn, query: sql.Composed, params=(), object_columns=()) -> pd.DataFrame:
    """A query's rows as a frame; `object_columns` keep Python values (lists, None) as read."""
    import pandas as pd  # late: exports and counts need no pandas

    with conn.cursor() as cur:
        cur.execute(query, params)
        columns = [d[0] for d in cur.description]
        rows = cur.fetchall()
    return pd.DataFrame({c: pd.Series([r[i] for r in rows], dtype=object if c in object_columns else None)
                         for i, c in enumerate(columns)}, columns=columns)


def current(conn, schema: str, table: str) -> pd.DataFrame:
    """The current rows, typed as the contract (lists as Python lists)."""
    return read_frame(conn, _select_contract(schema, table), object_columns=OBJECT_COLUMNS)


def preview(conn, schema: str, table: str, rows: int = 10) -> pd.DataFrame:
    """The first rows of the current table by key, for previews."""
    return read_frame(conn, sql.SQL("{} LIMIT %s").format(_select_contract(schema, table)), (rows,),
                      object_columns=OBJECT_COLUMNS)


def as_of(conn, schema: str, table: str, run_id: str) -> pd.DataFrame:
    """The table as it was right after run `run_id` loaded it (its latest load, when it loaded more
    than once), from the history table."""
    names.run_id(run_id)
    query = sql.SQL(
        "SELECT {cols}, h._run_id, h.valid_from, h.valid_to FROM {h} h JOIN {loads} l "
        "ON l.load_id = (SELECT max(load_id) FROM {loads} WHERE run_id = %s AND table_name = %s) "
        "WHERE h.valid_from <= l.loaded_at AND (h.valid_to IS NULL OR h.valid_to > l.loaded_at) "
        "ORDER BY h.{k}").format(cols=column_list(COLUMNS, "h"), h=ident(schema, history_table(table)),
                                 loads=ident(schema, LOADS_TABLE), k=sql.Identifier(KEY))
    return read_frame(conn, query, (run_id, table), object_columns=OBJECT_COLUMNS)


def versions(engine_: sa.Engine, schema: str, table: str, key: str) -> pd.DataFrame:
    """Every version of one country in the history table, oldest first (through SQLAlchemy)."""
    import pandas as pd  # late, as in read_frame
    import sqlalchemy as sa  # late: only this read goes through SQLAlchemy

    quote = engine_.dialect.identifier_preparer.quote
    hist = f"{quote(names.sql_identifier(schema, 'schema'))}.{quote(history_table(table))}"
    query = sa.text(f"SELECT {KEY}, population, area, capital, _run_id, valid_from, valid_to, is_current "
                    f"FROM {hist} WHERE {KEY} = :key ORDER BY valid_from")
    with engine_.connect() as conn:
        return pd.read_sql_query(query, conn, params={"key": key})


def history_after(conn, schema: str, table: str, staged: str) -> sql.Composed:
    """A query of the history of `schema.table` as the publish of the run staged in `staged` will
    leave it (lib/db_load.py `stage`): the published versions, those the run changes or retires
    closed at the staging time, then the run's new versions (no version_id yet)."""
    changes, current = ident(staged, changes_table(table)), ident(staged, table)
    k = sql.Identifier(KEY)
    staged_at = sql.SQL("(SELECT loaded_at FROM {} ORDER BY load_id DESC LIMIT 1)").format(ident(staged, LOADS_TABLE))
    pending = sql.SQL(
        "SELECT NULL::bigint AS version_id, {cols}, s._row_hash, s._run_id, s._loaded_at AS valid_from, "
        "NULL::timestamptz AS valid_to, true AS is_current FROM {s} s JOIN {c} c ON c.key = s.{k} "
        "AND c.change IN ('insert', 'update')").format(cols=column_list(COLUMNS, "s"), s=current, c=changes, k=k)
    if not table_exists(conn, schema, history_table(table)):
        return pending
    with conn.cursor() as cur:  # a contract column added since: NULL in the versions before it
        hist = as_migrated(cur, schema, history_table(table), HISTORY_COLUMNS)
    closed = sql.SQL("h.is_current AND c.change IN ('update', 'retire')")
    return sql.SQL(
        "SELECT h.version_id, {cols}, h._row_hash, h._run_id, h.valid_from, "
        "CASE WHEN {closed} THEN {at} ELSE h.valid_to END AS valid_to, "
        "h.is_current AND NOT coalesce({closed}, false) AS is_current "
        "FROM {h} h LEFT JOIN {c} c ON c.key = h.{k} UNION ALL {pending}").format(
        cols=column_list(COLUMNS, "h"), closed=closed, at=staged_at, h=hist,
        c=changes, k=k, pending=pending)


def versions_after(conn, schema: str, table: str, staged: str, key: str) -> pd.DataFrame:
    """`versions` of one country in the history as the publish of the run staged in `staged` will
    leave it (`history_after`)."""
    query = sql.SQL("SELECT {k}, population, area, capital, _run_id, valid_from, valid_to, is_current "
                    "FROM ({h}) v WHERE {k} = %s ORDER BY valid_from").format(
        k=sql.Identifier(KEY), h=history_after(conn, schema, table, staged))
    return read_frame(conn, query, (key,), object_columns=("capital",))


def total(conn, schema: str, table: str, column: str) -> str:
    """The exact sum of a whole-number column, as text (numeric in PostgreSQL: no overflow)."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT coalesce(sum({}), 0)::text FROM {}").format(
            sql.Identifier(names.sql_identifier(column, "column")), ident(schema, table)))
        return cur.fetchone()[0]


def count(conn, schema: str, table: str) -> int:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT count(*) FROM {}").format(ident(schema, table)))
        return cur.fetchone()[0]


def tables(conn, schema: str) -> list[str]:
    names.sql_identifier(schema, "schema")
    with conn.cursor() as cur:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = %s "
                    "AND table_type = 'BASE TABLE' ORDER BY table_name", (schema,))
        return [r[0] for r in cur.fetchall()]


# --- export ------------------------------------------------------------------------------------------

def export_query(conn, schema: str, table: str, pipeline_table: bool) -> str:
    """COPY statement for a table's CSV export. The pipeline's table exports its list columns as JSON
    arrays (the silver CSV form); any other table exports as PostgreSQL renders it."""
    if pipeline_table:
        cols = sql.SQL(", ").join(
            (sql.SQL("array_to_json({c})::text AS {c}") if c in LIST_COLUMNS else sql.SQL("{c}")).format(
                c=sql.Identifier(c)) for c in COLUMNS)
        inner = sql.SQL("SELECT {cols}, _row_hash, _run_id, _loaded_at FROM {t} ORDER BY {k}").format(
            cols=cols, t=ident(schema, table), k=sql.Identifier(KEY))
    else:
        inner = sql.SQL("SELECT * FROM {t} ORDER BY 1").format(t=ident(schema, table))
    return sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER true)").format(inner).as_string(conn)


def copy_out(conn, schema: str, table: str, sink, pipeline_table: bool = True,
             query: sql.Composable | None = None) -> int:
    """Stream a table's CSV into `sink` (anything with .write); returns the row count. `query` (a
    SELECT, `history_after` say) is exported in the table's place."""
    with conn.cursor() as cur:
        cur.execute("SET TIME ZONE 'UTC'")
        statement = export_query(conn, schema, table, pipeline_table) if query is None else \
            sql.SQL("COPY ({} ORDER BY 1) TO STDOUT WITH (FORMAT csv, HEADER true)").format(query).as_string(conn)
        cur.copy_expert(statement, sink)
        return cur.rowcount

