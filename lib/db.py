"""PostgreSQL: typed tables from the contract, transactional COPY-and-merge loads with history (SCD
type 2), streamed exports, point-in-time queries and the pipeline's advisory lock.

Every identifier is validated (lib.names) and then quoted by psycopg2.sql.Identifier."""

from __future__ import annotations

import contextlib
import io
import logging
import random
import time

from typing import TYPE_CHECKING

import psycopg2
import psycopg2.errors
import tenacity
from psycopg2 import sql

from lib import names
from lib.config import Database
from lib.errors import PipelineError
from lib.contract import CONTRACT, COLUMNS, KEY, LIST_COLUMNS, SQL_TYPES, TEXT_COLUMNS

if TYPE_CHECKING:  # pandas and SQLAlchemy are imported where they are used: the runner needs neither
    import pandas as pd
    import sqlalchemy as sa

log = logging.getLogger(__name__)

WRITE_MODES = ("upsert", "append", "replace")
LOADS_TABLE = "pipeline_loads"
LOCK_KEY = (7420, 1)  # (namespace, id) of the pipeline's session advisory lock
LOAD_LOCK_TIMEOUT = "60s"  # longest wait of a load for a lock held by another session
LOAD_WORK_MEM = "64MB"  # a load's work_mem (its joins and sorts over the batch; SET LOCAL)
APP_NAME = "countries-medallion"  # sessions are named "countries-medallion <stage> <run id>"
AUDIT_COLUMNS = ("_row_hash", "_run_id", "_loaded_at")
HISTORY_COLUMNS = ("version_id", "_row_hash", "_run_id", "valid_from", "valid_to", "is_current")
# Text and list columns read back as Python objects: pandas 3 would infer a string dtype, NaN for NULL.
OBJECT_COLUMNS = (*LIST_COLUMNS, *TEXT_COLUMNS)


class DatabaseError(PipelineError):
    """A database call failed; the message names the server (password masked)."""


class ContractMismatch(DatabaseError):
    """An existing table does not match the contract in a way the load cannot migrate safely."""


class BatchMismatch(DatabaseError):
    """The rows a load left in the table are not the batch it was given: rolled back."""


class RewindRefused(DatabaseError):
    """A load of older data over newer data, without allow_rewind."""


class LockBusy(DatabaseError):
    """Another run holds the pipeline lock."""

    exit_code = 3


def connect_args(db: Database, application_name: str = "countries-medallion") -> dict:
    return {"host": db.host, "port": db.port, "user": db.user, "password": db.password.reveal(),
            "dbname": db.name, "connect_timeout": db.connect_timeout, "application_name": application_name}


class _NotAnswering(Exception):
    """A connection attempt that may succeed later (the server starting, a network blip)."""


def connect(db: Database, application_name: str = "countries-medallion", attempts: int = 4,
            backoff: float = 0.5):
    """A psycopg2 connection, with bounded retries (a tenacity policy: exponential backoff with
    jitter) on connection failures. A refused password is final at once."""
    def once():
        try:
            return psycopg2.connect(**connect_args(db, application_name))
        except psycopg2.OperationalError as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if "password authentication failed" in message:
                raise DatabaseError(f"cannot connect to PostgreSQL at {db.masked_url}: {message}") from None
            raise _NotAnswering(message) from None

    exponential = tenacity.wait_exponential(multiplier=backoff)
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(_NotAnswering),
        stop=tenacity.stop_after_attempt(attempts),
        wait=lambda state: exponential(state) * random.uniform(0.5, 1.0),
        before_sleep=lambda state: log.warning("PostgreSQL at %s not answering (%s); retry in %.1fs", db.masked_url,
                                               state.outcome.exception(), state.upcoming_sleep))
    try:
        return retrying(once)
    except tenacity.RetryError as err:
        raise DatabaseError(f"cannot connect to PostgreSQL at {db.masked_url}: "
                            f"{err.last_attempt.exception()}") from None


def engine(db: Database, application_name: str = "countries-medallion") -> sa.Engine:
    """A SQLAlchemy engine for reads and previews (pandas.read_sql)."""
    import sqlalchemy as sa

    return sa.create_engine(
        "postgresql+psycopg2://",
        creator=lambda: connect(db, application_name),
        poolclass=sa.pool.NullPool,
    )


def ident(*parts: str) -> sql.Identifier:
    for p in parts:
        names.sql_identifier(p)
    return sql.Identifier(*parts)


def history_table(table: str) -> str:
    return names.sql_identifier(f"{table}_history", "history table name")


# --- DDL -------------------------------------------------------------------------------------------

def _contract_columns(with_key: bool) -> sql.Composed:
    parts = []
    for c in CONTRACT:
        text = f"{{}} {SQL_TYPES[c.kind]}" + ("" if c.nullable else " NOT NULL")
        if c.name == KEY and with_key:
            text += " PRIMARY KEY"
        if c.name in ("population", "area"):
            text += f" CHECK ({c.name} >= 0)"
        parts.append(sql.SQL(text).format(sql.Identifier(c.name)))
    return sql.SQL(", ").join(parts)


def _columns_of(cur, schema: str, table: str) -> dict[str, tuple[str, bool]]:
    """An existing table's columns: name → (type as PostgreSQL prints it, NOT NULL)."""
    cur.execute("SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull FROM pg_attribute a "
                "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
                (ident(schema, table).as_string(cur),))
    return {name: (kind, notnull) for name, kind, notnull in cur.fetchall()}


def migrate(cur, schema: str, table: str, extra: tuple[str, ...]) -> list[str]:
    """Bring an existing table to the contract: a new nullable contract column is added; any other
    difference (a missing NOT NULL column, another type or nullability, a column the contract no
    longer has) is refused with what to do. `extra` are the table's own non-contract columns.
    Returns the columns added."""
    found = _columns_of(cur, schema, table)
    where = f"{schema}.{table}"
    problems, added = [], []
    for c in CONTRACT:
        wanted = SQL_TYPES[c.kind]
        if c.name not in found:
            if not c.nullable:
                problems.append(f"column {c.name} ({wanted} NOT NULL) is in the contract but not in {where}: "
                                "a NOT NULL column cannot be added to existing rows; make it nullable in "
                                "lib/contract.py, or load into a new table")
                continue
            cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
                ident(schema, table), sql.Identifier(c.name), sql.SQL(wanted)))
            added.append(c.name)
        elif found[c.name][0] != wanted:
            problems.append(f"column {c.name} of {where} is {found[c.name][0]}, the contract says {wanted}: "
                            "change it by hand (ALTER TABLE … ALTER COLUMN … TYPE) or load into a new table")
        elif found[c.name][1] == c.nullable:
            problems.append(f"column {c.name} of {where} is {'NOT NULL' if found[c.name][1] else 'nullable'}, "
                            f"the contract says {'nullable' if c.nullable else 'NOT NULL'}: change it by hand "
                            "or load into a new table")
    for name in sorted(set(found) - set(COLUMNS) - set(extra)):
        problems.append(f"column {name} of {where} is not in the contract: drop it (ALTER TABLE … DROP "
                        "COLUMN) or put it back in lib/contract.py")
    if problems:
        raise ContractMismatch(f"{where} does not match the silver contract; nothing was loaded: " + "; ".join(problems))
    if added:
        log.info("added contract column(s) %s to %s", ", ".join(added), where)
    return added


def ensure_tables(cur, schema: str, table: str) -> None:
    hist = history_table(table)
    cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident(schema)))
    cur.execute(sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} ({}, _row_hash text NOT NULL, _run_id text NOT NULL, "
        "_loaded_at timestamptz NOT NULL)").format(ident(schema, table), _contract_columns(True)))
    cur.execute(sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (version_id bigserial PRIMARY KEY, {}, _row_hash text NOT NULL, "
        "_run_id text NOT NULL, valid_from timestamptz NOT NULL, valid_to timestamptz, "
        "is_current boolean NOT NULL)").format(ident(schema, hist), _contract_columns(False)))
    cur.execute(sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} ({}) WHERE is_current").format(
        ident(f"{hist}_current"[:63]), ident(schema, hist), sql.Identifier(KEY)))
    cur.execute(sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (load_id bigserial PRIMARY KEY, run_id text NOT NULL, "
        "table_name text NOT NULL, loaded_at timestamptz NOT NULL, mode text NOT NULL, "
        "inserted integer NOT NULL, updated integer NOT NULL, unchanged integer NOT NULL, "
        "retired integer NOT NULL, repaired integer NOT NULL DEFAULT 0, data_as_of timestamptz)").format(
        ident(schema, LOADS_TABLE)))
    migrate_loads(cur, schema)
    migrate(cur, schema, table, AUDIT_COLUMNS)
    migrate(cur, schema, hist, HISTORY_COLUMNS)


def migrate_loads(cur, schema: str) -> None:
    """A load log from before every load had its own row (PRIMARY KEY (run_id, table_name)) gets a
    `load_id` key, numbered in load order, and the columns added since."""
    loads = ident(schema, LOADS_TABLE)
    found = _columns_of(cur, schema, LOADS_TABLE)
    if "load_id" not in found:
        cur.execute("SELECT conname FROM pg_constraint WHERE conrelid = to_regclass(%s) AND contype = 'p'",
                    (loads.as_string(cur),))
        for (name,) in cur.fetchall():
            cur.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(loads, sql.Identifier(name)))
        cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN load_id bigint").format(loads))
        cur.execute(sql.SQL("UPDATE {t} l SET load_id = o.n FROM (SELECT ctid, row_number() OVER "
                            "(ORDER BY loaded_at, run_id) AS n FROM {t}) o WHERE l.ctid = o.ctid").format(t=loads))
        sequence = ident(schema, f"{LOADS_TABLE}_load_id_seq")
        cur.execute(sql.SQL("CREATE SEQUENCE IF NOT EXISTS {} OWNED BY {}.load_id").format(sequence, loads))
        cur.execute(sql.SQL("SELECT setval(%s, coalesce((SELECT max(load_id) FROM {}), 0) + 1, false)").format(loads),
                    (sequence.as_string(cur),))
        cur.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN load_id SET DEFAULT nextval(%s::regclass), "
                            "ALTER COLUMN load_id SET NOT NULL, ADD PRIMARY KEY (load_id)").format(loads),
                    (sequence.as_string(cur),))
        log.info("%s.%s: every load now gets its own row (load_id)", schema, LOADS_TABLE)
    if "repaired" not in found:
        cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN repaired integer NOT NULL DEFAULT 0").format(loads))
    if "data_as_of" not in found:
        cur.execute(sql.SQL("ALTER TABLE {} ADD COLUMN data_as_of timestamptz").format(loads))


def _list_json(prefix: str | None = None) -> sql.Composed:
    """The contract columns for a COPY out: list columns as JSON arrays (the silver CSV form)."""
    return sql.SQL(", ").join(
        (sql.SQL("array_to_json({c})::text AS {n}") if c in LIST_COLUMNS else sql.SQL("{c}")).format(
            c=sql.Identifier(prefix, c) if prefix else sql.Identifier(c), n=sql.Identifier(c)) for c in COLUMNS)


def _piped(write):
    """Start `write(sink)` in a thread writing into a pipe; its reading end, the thread, and the dict
    that gets write's return value ("result") or its error ("error")."""
    import os
    import threading

    read_fd, write_fd = os.pipe()
    with contextlib.suppress(ImportError, OSError, AttributeError):  # a 1 MiB pipe (Linux), fewer wake-ups
        import fcntl

        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    reader, writer = open(read_fd, "rb", buffering=1 << 20), open(write_fd, "wb", buffering=1 << 16)
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = write(writer)
        except BaseException as err:  # handed to the reading thread
            outcome["error"] = err
        finally:
            with contextlib.suppress(OSError):
                writer.close()

    thread = threading.Thread(target=run, name="pipe-writer", daemon=True)
    thread.start()
    return reader, thread, outcome


@contextlib.contextmanager
def streamed(copy):
    """Run `copy(sink)` (a COPY ... TO STDOUT into `sink`) in a thread writing into a pipe, and yield
    the pipe's reading end, so the rows are parsed while PostgreSQL still renders them (the server
    and the parse each take a core). The reader must be read to its end. An error of the COPY is
    raised once the reading is done (before the reader's own, which a cut-off stream would cause);
    leaving early closes the pipe, which ends the COPY. `copy`'s return value ends up in the dict
    yielded beside the reader, under "result"."""
    reader, thread, outcome = _piped(copy)
    try:
        yield reader, outcome
    except BaseException:
        reader.close()
        thread.join()
        if isinstance(outcome.get("error"), psycopg2.Error):
            raise outcome["error"] from None  # the server's error, not the parse of a cut-off stream
        raise
    reader.close()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]


class _Fed:
    """The reading end of `fed`'s pipe: its end raises the producer's error, so a COPY ... FROM STDIN
    reading it fails (and its transaction rolls back) instead of loading a cut-off batch."""

    def __init__(self, reader, thread, outcome):
        self.reader, self.thread, self.outcome = reader, thread, outcome

    def read(self, size: int = -1) -> bytes:
        chunk = self.reader.read(size)
        if not chunk:
            self.thread.join()
            if "error" in self.outcome:
                raise self.outcome["error"]
        return chunk


@contextlib.contextmanager
def fed(produce):
    """Run `produce(sink)` (writing a CSV for `merge`, say) in a thread writing into a pipe, and yield
    a reader of it for COPY ... FROM STDIN, so the rows are produced while PostgreSQL copies the
    previous ones; and a dict that gets produce's return value under "result". The producer's
    error wins over the reader's (a COPY failed by it)."""
    reader, thread, outcome = _piped(produce)
    try:
        yield _Fed(reader, thread, outcome), outcome
    except BaseException:
        reader.close()  # a producer still writing stops (broken pipe)
        thread.join()
        if "error" in outcome and not isinstance(outcome["error"], BrokenPipeError):
            raise outcome["error"] from None
        raise
    reader.close()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]


def _hashed_rows(cur, query: sql.Composable, extra: dict[str, str]):
    """Stream a query's rows (the contract columns as `_list_json` gives them, then `extra` columns:
    name → "string" or "bool") out of PostgreSQL with COPY, and yield Arrow record batches of them
    with each row's hash recomputed from its values (quality.arrow_row_hashes). COPY renders every
    value as text (floats exactly); the rows are parsed as they arrive (`streamed`), so a table of
    any size is read in bounded memory while the server renders the next ones."""
    import pyarrow as pa

    from lib import formats, quality  # late: quality pulls in pandera

    statement = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER true)").format(query).as_string(cur)
    types = {name: pa.bool_() if kind == "bool" else pa.string() for name, kind in extra.items()}
    with streamed(lambda sink: cur.copy_expert(statement, sink)) as (stream, _):
        for batch in formats.csv_arrow_batches(stream, extra=types):
            yield batch, quality.arrow_row_hashes(batch)


def _short(keys) -> str:
    keys = sorted(keys)
    return ", ".join(repr(k) for k in keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")


# --- load --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def transaction(conn):
    """One transaction, also on an autocommit connection. Commit on success; on any error roll back
    (when the connection still lives) and let the original error through, not the rollback's own
    ("connection already closed")."""
    autocommit = conn.autocommit
    conn.autocommit = False
    try:
        yield
        conn.commit()
    except BaseException:
        with contextlib.suppress(psycopg2.Error):
            conn.rollback()
        raise
    finally:
        if autocommit:
            with contextlib.suppress(psycopg2.Error):
                conn.autocommit = True


def _cols(names_: list[str] | tuple[str, ...], prefix: str | None = None) -> sql.Composed:
    if prefix:
        return sql.SQL(", ").join(sql.Identifier(prefix, n) for n in names_)
    return sql.SQL(", ").join(sql.Identifier(n) for n in names_)


def _typed_select() -> sql.Composed:
    """Staging text → contract types; lists arrive as JSON arrays."""
    parts = []
    for c in CONTRACT:
        col = sql.Identifier(c.name)
        if c.kind == "text[]":
            parts.append(sql.SQL("ARRAY(SELECT jsonb_array_elements_text({}::jsonb)) AS {}").format(col, col))
        else:
            parts.append(sql.SQL("{}::{} AS {}").format(col, sql.SQL(SQL_TYPES[c.kind]), col))
    parts.append(sql.SQL("_row_hash"))
    return sql.SQL(", ").join(parts)


LIST_FORMATS = ("json", "array")


def _stage_batch(cur, csv_data, lists: str) -> None:
    """The batch as the temporary table `_batch` (contract types, then _row_hash). With lists="array"
    (PostgreSQL array literals, as formats.copy_csv writes them) COPY types every cell itself; with
    lists="json" (the silver CSV) the rows are copied as text and cast, each JSON array unnested."""
    source = csv_data if hasattr(csv_data, "read") else io.BytesIO(csv_data)
    copy = sql.SQL("COPY {} ({}, _row_hash) FROM STDIN WITH (FORMAT csv, HEADER true)")
    if lists == "array":
        cur.execute(sql.SQL("CREATE TEMP TABLE _batch ({}, _row_hash text) ON COMMIT DROP").format(
            sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(SQL_TYPES[c.kind]))
                               for c in CONTRACT)))
        cur.copy_expert(copy.format(sql.Identifier("_batch"), _cols(COLUMNS)).as_string(cur), source)
        return
    cur.execute(sql.SQL("CREATE TEMP TABLE _stage ({}, _row_hash text) ON COMMIT DROP").format(
        sql.SQL(", ").join(sql.SQL("{} text").format(sql.Identifier(c)) for c in COLUMNS)))
    cur.copy_expert(copy.format(sql.Identifier("_stage"), _cols(COLUMNS)).as_string(cur), source)
    cur.execute(sql.SQL("CREATE TEMP TABLE _batch ON COMMIT DROP AS SELECT {} FROM _stage").format(_typed_select()))


def merge(conn, csv_data, *, schema: str, table: str, run_id: str, mode: str = "upsert",
          retire_missing: bool = True, lock_timeout: str = LOAD_LOCK_TIMEOUT,
          expected_fingerprint: str | None = None, data_as_of: str | None = None,
          allow_rewind: bool = False, lists: str = "json") -> dict:
    """Load a CSV (bytes or a binary file object: the contract columns then _row_hash) into
    `schema.table` in ONE transaction: COPY into a temporary table, then merge. Its list cells are
    JSON arrays (lists="json", the silver CSV) or PostgreSQL array literals (lists="array", what
    formats.copy_csv writes: COPY types them itself, no cast).

    upsert:  new keys inserted, changed rows updated (history: old version closed, new one opened),
             unchanged rows untouched; with retire_missing, keys absent from the batch are removed
             from the current table and their history closed.
    append:  only keys not present yet are inserted; existing rows are never changed.
    replace: the current table becomes exactly the batch (every row rewritten by this run); history
             as for upsert with retire_missing.
    "Unchanged" is decided from the values, not from the stored `_row_hash`: a row edited in the
    table behind the pipeline's back (its values no longer give its `_row_hash`) is reported as
    drift and, in upsert and replace, repaired. Append never changes a row, so a key it skips must
    already hold the batch's values.
    Before committing, the table is read back once (COPY, in the same transaction): the fingerprint
    of the batch's rows, recomputed from the stored values, is compared with `expected_fingerprint`
    (stage 2's `clean_fingerprint`), any difference rolling the load back (the rows not stored as
    staged are named, compared in SQL, when that proof fails or is not given), and the whole table's
    fingerprint is returned as `current_fingerprint`.
    `data_as_of` (when the batch's data was fetched) is kept in the load log; a batch older than
    the table's latest load is refused unless `allow_rewind`.
    On any error the transaction is rolled back and the tables are as they were. A lock held by another
    session (a killed run's, say) is waited for `lock_timeout` at most, then the load fails saying so.
    """
    if mode not in WRITE_MODES:
        raise ValueError(f"write mode {mode!r} is not one of {', '.join(WRITE_MODES)}")
    if lists not in LIST_FORMATS:
        raise ValueError(f"list format {lists!r} is not one of {', '.join(LIST_FORMATS)}")
    names.run_id(run_id)
    names.schema(schema)
    target, hist, loads = ident(schema, table), ident(schema, history_table(table)), ident(schema, LOADS_TABLE)
    retire = mode == "replace" or (retire_missing and mode == "upsert")  # append never removes rows
    data_cols = _cols(COLUMNS)
    try:
        with transaction(conn):
            with conn.cursor() as cur:
                cur.execute("SET LOCAL lock_timeout = %s", (lock_timeout,))
                # Room for the batch's hash joins (this transaction only).
                cur.execute("SET LOCAL work_mem = %s", (LOAD_WORK_MEM,))
                absent = [ident(schema, name) for name in (table, history_table(table))
                          if not table_exists(conn, schema, name)]
                ensure_tables(cur, schema, table)
                fresh = [t for t in absent if _created_here(cur, t)]
                _stage_batch(cur, csv_data, lists)
                cur.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(loads))
                # No other session writes the table until this one commits (readers go on): the rows
                # compared below are the rows written over, and a key found new stays new.
                cur.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(target))
                _refuse_rewind(cur, loads, schema, table, run_id, data_as_of, allow_rewind)
                differs = sql.SQL(" OR ").join(
                    sql.SQL("t.{c} IS DISTINCT FROM b.{c}").format(c=sql.Identifier(c)) for c in COLUMNS[1:])
                cur.execute(sql.SQL(
                    "CREATE TEMP TABLE _changes ON COMMIT DROP AS "
                    "SELECT b.{k} AS key, CASE WHEN t.{k} IS NULL THEN 'insert' "
                    "WHEN {differs} OR t._row_hash IS DISTINCT FROM b._row_hash THEN 'update' "
                    "ELSE 'unchanged' END AS change "
                    "FROM _batch b LEFT JOIN {t} t ON t.{k} = b.{k}").format(
                    k=sql.Identifier(KEY), t=target, differs=differs))
                # Drift: a row whose values no longer give the hash the pipeline stored with them. A
                # row that differs from the batch (in values or hash) is hashed here, before it is
                # rewritten; a row equal to the batch gives the batch's hash, checked after the write.
                drift = _drifted(cur, sql.SQL(
                    "SELECT {cols}, t._row_hash FROM {t} t JOIN _changes c ON c.key = t.{k} "
                    "AND c.change = 'update'").format(cols=_list_json("t"), t=target, k=sql.Identifier(KEY)))
                if mode == "append":
                    cur.execute("SELECT key FROM _changes WHERE change = 'update'")
                    kept = [r[0] for r in cur.fetchall()]
                    if kept:
                        raise BatchMismatch(
                            f"append mode keeps existing rows, but {len(kept)} key(s) of the batch are in "
                            f"{schema}.{table} with other values: {_short(kept)}"
                            + (f" (changed in the table behind the pipeline's back: {_short(drift)})" if drift else "")
                            + "; nothing was loaded. Load with write_mode=upsert to update (and repair) them")
                if retire:
                    cur.execute(sql.SQL(
                        "INSERT INTO _changes SELECT t.{k}, 'retire' FROM {t} t "
                        "WHERE NOT EXISTS (SELECT 1 FROM _batch b WHERE b.{k} = t.{k})").format(
                        k=sql.Identifier(KEY), t=target))
                cur.execute("SELECT change, count(*) FROM _changes GROUP BY change")
                counts = {"insert": 0, "update": 0, "unchanged": 0, "retire": 0, **dict(cur.fetchall())}

                def of_batch(changes: tuple[str, ...]) -> sql.Composable:
                    """The batch rows whose change is one of `changes` (no filter when that is all of
                    them), in the batch's order: sorting a million rows by key first cost more (~2.5 s
                    a write) than filling the indexes out of order, for inserts and updates alike."""
                    if all(counts[c] == 0 for c in ("insert", "update", "unchanged") if c not in changes):
                        return sql.SQL("FROM _batch")
                    return sql.SQL("FROM _batch WHERE {} IN (SELECT key FROM _changes WHERE change IN ({}))").format(
                        sql.Identifier(KEY), sql.SQL(", ").join(map(sql.Literal, changes)))

                # A table created by this load (no other session can see it yet) gets its keys and
                # indexes built after its rows are in, not row by row.
                indexes = _drop_indexes(cur, fresh)
                # History: close the current version of changed and retired keys, open new versions.
                cur.execute(sql.SQL(
                    "UPDATE {h} SET valid_to = now(), is_current = false WHERE is_current AND {k} IN "
                    "(SELECT key FROM _changes WHERE change IN ('update', 'retire'))").format(
                    h=hist, k=sql.Identifier(KEY)))
                cur.execute(sql.SQL(
                    "INSERT INTO {h} ({cols}, _row_hash, _run_id, valid_from, valid_to, is_current) "
                    "SELECT {cols}, _row_hash, %s, now(), NULL, true {rows}").format(
                    h=hist, cols=data_cols, rows=of_batch(("insert", "update"))), (run_id,))
                # Current rows.
                if mode == "replace":
                    cur.execute(sql.SQL("DELETE FROM {}").format(target))
                    written = ("insert", "update", "unchanged")
                else:
                    cur.execute(sql.SQL("DELETE FROM {t} WHERE {k} IN (SELECT key FROM _changes "
                                        "WHERE change = 'retire')").format(t=target, k=sql.Identifier(KEY)))
                    written = ("insert", "update")
                updates = sql.SQL(", ").join(
                    sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c))
                    for c in [*COLUMNS[1:], *AUDIT_COLUMNS])
                # An updated key is still in the table (replace emptied it): only then can a row
                # conflict, the table being locked against other writers.
                conflict = sql.SQL(" ON CONFLICT ({}) DO UPDATE SET {}").format(sql.Identifier(KEY), updates) \
                    if counts["update"] and mode != "replace" else sql.SQL("")
                cur.execute(sql.SQL(
                    "INSERT INTO {t} ({cols}, _row_hash, _run_id, _loaded_at) "
                    "SELECT {cols}, _row_hash, %s, now() {rows}{conflict}").format(
                    t=target, cols=data_cols, rows=of_batch(written), conflict=conflict), (run_id,))
                _build_indexes(cur, indexes)
                # Audit before commit: the table is read back once, and the fingerprint of the batch's
                # rows, recomputed from the stored values, must be the silver table's. Rows that are
                # not stored as the batch has them are named (compared in SQL, doubles by their bits)
                # whenever that proof is missing or fails.
                batch_fp, current_fp, unproven = _table_fingerprints(cur, target)
                fingerprint = batch_fp["fingerprint"]
                if expected_fingerprint is None or fingerprint != expected_fingerprint:
                    wrong = _not_as_sent(cur, target)
                    if wrong:
                        raise BatchMismatch(f"{len(wrong)} row(s) of the batch are not stored as sent: "
                                            f"{_short(wrong)}; rolled back")
                if expected_fingerprint is not None and fingerprint != expected_fingerprint:
                    raise BatchMismatch(
                        f"the {batch_fp['rows']} rows loaded have fingerprint {fingerprint[:16]}, the silver "
                        f"record says {expected_fingerprint[:16]}: the batch is not the silver table; rolled back")
                drift = sorted(set(drift) | set(unproven))
                repaired = drift  # every drifted row is a row of the batch, now stored as the batch has it
                cur.execute(sql.SQL(
                    "INSERT INTO {} (run_id, table_name, loaded_at, mode, inserted, updated, unchanged, retired, "
                    "repaired, data_as_of) VALUES (%s, %s, now(), %s, %s, %s, %s, %s, %s, %s) RETURNING load_id").format(
                    loads),
                    (run_id, table, mode, counts["insert"], counts["update"], counts["unchanged"],
                     counts["retire"], len(repaired), data_as_of))
                load_id = cur.fetchone()[0]
                current = current_fp["rows"]
    except DatabaseError:
        raise
    except psycopg2.errors.LockNotAvailable:
        raise DatabaseError(
            f"loading {schema}.{table} waited {lock_timeout} for a lock held by another session and was "
            "rolled back: a killed run's session may still hold it (--resume ends the run's own sessions)"
        ) from None
    except psycopg2.Error as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        detail = getattr(getattr(err, "diag", None), "message_detail", None)  # which key, which row
        raise DatabaseError(f"loading {schema}.{table} failed and was rolled back: {first}"
                            + (f" ({detail.strip()})" if detail else "")) from None
    result = {"inserted": counts["insert"], "updated": counts["update"], "unchanged": counts["unchanged"],
              "retired": counts["retire"], "current_rows": current, "mode": mode, "load_id": load_id,
              "batch_rows": batch_fp["rows"], "batch_fingerprint": fingerprint,
              "current_fingerprint": current_fp["fingerprint"],
              "drift": {"rows": len(drift), "keys": drift[:50], "repaired": len(repaired)}}
    if drift:
        log.warning("%s.%s: %d row(s) had been changed outside the pipeline (%s); %s", schema, table, len(drift),
                    _short(drift), "repaired" if repaired else "reported")
    log.info("loaded %s.%s for run %s: %s", schema, table, run_id, result)
    return result


def _created_here(cur, table: sql.Identifier) -> bool:
    """Whether this transaction created `table` (and not another session between our look and our
    CREATE ... IF NOT EXISTS): its catalog row was written by this transaction."""
    cur.execute("SELECT c.xmin = pg_current_xact_id()::xid FROM pg_class c WHERE c.oid = to_regclass(%s)",
                (table.as_string(cur),))
    row = cur.fetchone()
    return bool(row and row[0])


def _drop_indexes(cur, tables: list[sql.Identifier]) -> list[tuple[sql.Identifier, list, list]]:
    """Drop the primary keys and indexes of `tables` (created by this transaction, so no other session
    sees them), returning their definitions as PostgreSQL gives them for `_build_indexes`. Filling a
    table and then building each index in one sort is the bulk load's way (pg_restore's). A million
    rows in random key order (measured with psql): the keyed table 5.0 s against 1.4 s unkeyed and
    0.7 s to build its key; its history 6.3 s against 1.7 s and 1.2 s to build its two indexes."""
    saved = []
    for table in tables:
        cur.execute("SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                    "WHERE conrelid = to_regclass(%s) AND contype = 'p'", (table.as_string(cur),))
        keys = cur.fetchall()
        cur.execute("SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index "
                    "WHERE indrelid = to_regclass(%s) AND NOT indisprimary", (table.as_string(cur),))
        indexes = cur.fetchall()
        for name, _ in keys:
            cur.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(table, sql.Identifier(name)))
        for name, _ in indexes:
            cur.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(name)))  # as regclass prints it: quoted
        saved.append((table, keys, indexes))
    return saved


def _build_indexes(cur, saved: list[tuple[sql.Identifier, list, list]]) -> None:
    """Build again what `_drop_indexes` dropped, from PostgreSQL's own definitions. A batch with a key
    twice fails here as it would have on insert, and the load is rolled back."""
    for table, keys, indexes in saved:
        for name, definition in keys:
            cur.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                table, sql.Identifier(name), sql.SQL(definition)))
        for _, definition in indexes:
            cur.execute(definition)


def _drifted(cur, query: sql.Composable) -> list[str]:
    """Keys of the rows (contract columns and _row_hash) whose values no longer give their _row_hash."""
    drift = []
    for batch, hashes in _hashed_rows(cur, query, {"_row_hash": "string"}):
        drift += [k for k, h, stored in zip(batch.column(KEY).to_pylist(), hashes, batch.column("_row_hash").to_pylist())
                  if h != stored]
    return drift


def _not_as_sent(cur, target) -> list[str]:
    """Keys of the batch whose row is missing from the table or differs from the staged row."""
    exact = sql.SQL(" OR ").join(
        (sql.SQL("float8send(t.{c}) IS DISTINCT FROM float8send(b.{c})") if c == "area" else
         sql.SQL("t.{c} IS DISTINCT FROM b.{c}")).format(c=sql.Identifier(c)) for c in COLUMNS[1:])
    cur.execute(sql.SQL("SELECT b.{k} FROM _batch b LEFT JOIN {t} t ON t.{k} = b.{k} "
                        "WHERE t.{k} IS NULL OR {exact}").format(k=sql.Identifier(KEY), t=target, exact=exact))
    return sorted(r[0] for r in cur.fetchall())


def _table_fingerprints(cur, target) -> tuple[dict, dict, list[str]]:
    """One pass over the current table as it now stands in this transaction: the fingerprint of the
    batch's rows, of the whole table (both recomputed from the stored values), and the batch rows
    that `_changes` found equal to the batch (values and _row_hash) whose values do not give that
    _row_hash: drift that an equal row could not show before the write."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from lib import quality

    query = sql.SQL("SELECT {cols}, t._row_hash, c.change AS _change FROM {t} t "
                    "LEFT JOIN _changes c ON c.key = t.{k}").format(cols=_list_json("t"), t=target,
                                                                      k=sql.Identifier(KEY))
    current_fp, in_batch, unproven = quality.Fingerprint(), [], []
    for rows, hashes in _hashed_rows(cur, query, {"_row_hash": "string", "_change": "string"}):
        hashes = pa.array(hashes, pa.large_string())
        current_fp.add(rows, hashes)
        change = rows.column("_change")
        if len(rows):
            in_batch.append(pc.fill_null(pc.is_in(change, value_set=pa.array(["insert", "update", "unchanged"])), False))
        equal = pc.fill_null(pc.equal(change, "unchanged"), False)
        wrong_hash = pc.not_equal(hashes, pc.cast(rows.column("_row_hash"), pa.large_string()))
        unproven += rows.column(KEY).filter(pc.and_(equal, wrong_hash)).to_pylist()
    if all(pc.all(mask).as_py() is not False for mask in in_batch):  # every row is the batch's: one fingerprint
        current = current_fp.result()
        return dict(current), current, unproven
    batch = current_fp.subset(in_batch).result()
    return batch, current_fp.result(), unproven


def _refuse_rewind(cur, loads, schema: str, table: str, run_id: str, data_as_of: str | None,
                   allow_rewind: bool) -> None:
    """Refuse to load data fetched before the data of the table's latest load, unless asked to."""
    if data_as_of is None or allow_rewind:
        return
    cur.execute(sql.SQL("SELECT run_id, data_as_of, data_as_of > %s::timestamptz FROM {} WHERE table_name = %s "
                        "ORDER BY load_id DESC LIMIT 1").format(loads), (data_as_of, table))
    latest = cur.fetchone()
    if latest is not None and latest[2]:
        raise RewindRefused(
            f"run {run_id}'s data (fetched {data_as_of}) is older than what {schema}.{table} holds (loaded by "
            f"run {latest[0]}, data fetched {latest[1].isoformat()}): loading it would take the table back in "
            "time; nothing was loaded. To do it on purpose: -p allow_rewind=true (a parameter of the load)")


# --- reads -------------------------------------------------------------------------------------------

def _select_contract(schema: str, table: str, where: sql.Composable = sql.SQL("")) -> sql.Composed:
    return sql.SQL("SELECT {cols}, _row_hash, _run_id, _loaded_at FROM {t} {where} ORDER BY {k}").format(
        cols=_cols(COLUMNS), t=ident(schema, table), where=where, k=sql.Identifier(KEY))


def read_frame(conn, query: sql.Composed, params=(), object_columns=()) -> pd.DataFrame:
    """A query's rows as a frame; `object_columns` keep Python values (lists, None) as read."""
    import pandas as pd

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
        "ORDER BY h.{k}").format(cols=_cols(COLUMNS, "h"), h=ident(schema, history_table(table)),
                                 loads=ident(schema, LOADS_TABLE), k=sql.Identifier(KEY))
    return read_frame(conn, query, (run_id, table), object_columns=OBJECT_COLUMNS)


def versions(engine_: sa.Engine, schema: str, table: str, key: str) -> pd.DataFrame:
    """Every version of one country in the history table, oldest first (through SQLAlchemy)."""
    import pandas as pd
    import sqlalchemy as sa

    quote = engine_.dialect.identifier_preparer.quote
    hist = f"{quote(names.sql_identifier(schema, 'schema'))}.{quote(history_table(table))}"
    query = sa.text(f"SELECT {KEY}, population, area, capital, _run_id, valid_from, valid_to, is_current "
                    f"FROM {hist} WHERE {KEY} = :key ORDER BY valid_from")
    with engine_.connect() as conn:
        return pd.read_sql_query(query, conn, params={"key": key})


def count(conn, schema: str, table: str) -> int:
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT count(*) FROM {}").format(ident(schema, table)))
        return cur.fetchone()[0]


def table_exists(conn, schema: str, table: str) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL",
                    (ident(schema, table).as_string(conn),))
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


def copy_out(conn, schema: str, table: str, sink, pipeline_table: bool = True) -> int:
    """Stream a table's CSV into `sink` (anything with .write); returns the row count."""
    with conn.cursor() as cur:
        cur.execute("SET TIME ZONE 'UTC'")
        cur.copy_expert(export_query(conn, schema, table, pipeline_table), sink)
        return cur.rowcount


# --- the pipeline lock -------------------------------------------------------------------------------

@contextlib.contextmanager
def pipeline_lock(db: Database, run_id: str, wait_seconds: float = 0.0):
    """Hold the session advisory lock for a whole run, so two runs against the same database (from
    any machine) never interleave. Waits up to `wait_seconds`, then raises LockBusy naming the holder."""
    conn = connect(db, application_name=f"countries-medallion run {run_id}")
    conn.autocommit = True
    deadline = time.monotonic() + wait_seconds
    try:
        with conn.cursor() as cur:
            while True:
                cur.execute("SELECT pg_try_advisory_lock(%s, %s)", LOCK_KEY)
                if cur.fetchone()[0]:
                    break
                if time.monotonic() >= deadline:
                    cur.execute(
                        "SELECT a.application_name, a.backend_start FROM pg_locks l "
                        "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
                        "AND l.classid = %s AND l.objid = %s AND l.granted", LOCK_KEY)
                    holder = cur.fetchone()
                    who = f"{holder[0]!r} (since {holder[1]:%Y-%m-%d %H:%M:%S %Z})" if holder else "another session"
                    raise LockBusy(f"another pipeline run holds the lock on {db.masked_url}: {who}. "
                                   "Wait for it to finish, or pass --wait-for-lock SECONDS")
                time.sleep(0.5)
        yield
    finally:
        with contextlib.suppress(psycopg2.Error):
            conn.close()  # closing the session releases the lock


def end_run_sessions(db: Database, run_id: str) -> list[dict]:
    """End the server sessions that a dead run of `run_id` left behind (a kernel killed mid-load keeps
    its session, locks included, until the server notices). Call it holding the pipeline lock, so no
    live run of `run_id` can own them. Sessions are recognised by their application_name, which every
    stage sets to "countries-medallion <stage> <run id>"; the runner's own ("run") session is spared."""
    names.run_id(run_id)
    conn = connect(db, application_name=f"{APP_NAME} resume {run_id}")
    conn.autocommit = True
    ended = []
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pid, application_name, state, backend_start FROM pg_stat_activity "
                        "WHERE pid <> pg_backend_pid() AND datname = current_database() "
                        "AND usename = current_user AND application_name LIKE %s",
                        (f"{APP_NAME} % {run_id}",))
            for pid, app, state, started in cur.fetchall():
                parts = app.split(" ")
                if len(parts) != 3 or parts[2] != run_id or parts[1] in ("run", "resume"):
                    continue
                cur.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
                if cur.fetchone()[0]:
                    ended.append({"pid": pid, "stage": parts[1], "state": state, "since": started})
    finally:
        conn.close()
    for s in ended:
        log.warning("ended a lingering session of run %s: server pid %s (%s, %s since %s)", run_id, s["pid"],
                    s["stage"], s["state"], f"{s['since']:%Y-%m-%d %H:%M:%S %Z}")
    return ended
