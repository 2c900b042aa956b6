"""The load: a batch (CSV) into PostgreSQL in one transaction, COPY into a temporary table then merge
into the current table with history (SCD type 2), proven against the silver fingerprint before the
commit; and the pipes that let a COPY run while its rows are produced or parsed."""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import threading
from dataclasses import dataclass

import psycopg2
import psycopg2.errors
from psycopg2 import sql

from lib import formats, names, quality
from lib.contract import CONTRACT, COLUMNS, KEY, LIST_COLUMNS
from lib.db import (LOADS_TABLE, WRITE_MODES, BatchMismatch, DatabaseError, RewindRefused, column_list, ident,
                    table_exists, transaction)
from lib.db_schema import AUDIT_COLUMNS, ensure_tables, history_table

log = logging.getLogger(__name__)

LOAD_LOCK_TIMEOUT = "60s"  # longest wait of a load for a lock held by another session
LOAD_WORK_MEM = "64MB"  # a load's work_mem (its joins and sorts over the batch; SET LOCAL)
LIST_FORMATS = ("json", "array")


# --- COPY through a pipe -----------------------------------------------------------------------------

def _piped(write):
    """Start `write(sink)` in a thread writing into a pipe; its reading end, the thread, and the dict
    that gets write's return value ("result") or its error ("error")."""

    read_fd, write_fd = os.pipe()
    with contextlib.suppress(ImportError, OSError, AttributeError):  # a 1 MiB pipe (Linux), fewer wake-ups

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


# --- the load ----------------------------------------------------------------------------------------

def _list_json(prefix: str | None = None) -> sql.Composed:
    """The contract columns for a COPY out: list columns as JSON arrays (the silver CSV form)."""
    return sql.SQL(", ").join(
        (sql.SQL("array_to_json({c})::text AS {n}") if c in LIST_COLUMNS else sql.SQL("{c}")).format(
            c=sql.Identifier(prefix, c) if prefix else sql.Identifier(c), n=sql.Identifier(c)) for c in COLUMNS)


def _hashed_rows(cur, query: sql.Composable, extra: dict[str, str]):
    """Stream a query's rows (the contract columns as `_list_json` gives them, then `extra` columns:
    name → "string" or "bool") out of PostgreSQL with COPY, and yield Arrow record batches of them
    with each row's hash recomputed from its values (quality.arrow_row_hashes). COPY renders every
    value as text (floats exactly); the rows are parsed as they arrive (`streamed`), so a table of
    any size is read in bounded memory while the server renders the next ones."""
    import pyarrow as pa  # late, as in lib.formats: only reading back needs Arrow

    statement = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER true)").format(query).as_string(cur)
    types = {name: pa.bool_() if kind == "bool" else pa.string() for name, kind in extra.items()}
    with streamed(lambda sink: cur.copy_expert(statement, sink)) as (stream, _):
        for batch in formats.csv_arrow_batches(stream, extra=types):
            yield batch, quality.arrow_row_hashes(batch)


def _short(keys) -> str:
    keys = sorted(keys)
    return ", ".join(repr(k) for k in keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")


def _typed_select() -> sql.Composed:
    """Staging text → contract types; lists arrive as JSON arrays."""
    parts = []
    for c in CONTRACT:
        col = sql.Identifier(c.name)
        if c.type.is_list:
            parts.append(sql.SQL("ARRAY(SELECT jsonb_array_elements_text({}::jsonb)) AS {}").format(col, col))
        else:
            parts.append(sql.SQL("{}::{} AS {}").format(col, sql.SQL(c.type.sql), col))
    parts.append(sql.SQL("_row_hash"))
    return sql.SQL(", ").join(parts)


@dataclass(frozen=True)
class TableSource:
    """A batch already in the database: the contract columns and _row_hash of `schema.table` (a run's
    staging copy, made by lib/db_schema.py's DDL), which `merge` reads in SQL: its rows never pass
    through this process."""

    schema: str
    table: str


def _stage_batch(cur, csv_data, lists: str) -> None:
    """The batch as the temporary table `_batch` (contract types, then _row_hash). With lists="array"
    (PostgreSQL array literals, as formats.copy_csv writes them) COPY types every cell itself; with
    lists="json" (the silver CSV) the rows are copied as text and cast, each JSON array unnested. A
    `TableSource` is selected from, typed already."""
    if isinstance(csv_data, TableSource):
        cur.execute(sql.SQL("CREATE TEMP TABLE _batch ON COMMIT DROP AS SELECT {}, _row_hash FROM {}").format(
            column_list(COLUMNS), ident(csv_data.schema, csv_data.table)))
        return
    source = csv_data if hasattr(csv_data, "read") else io.BytesIO(csv_data)
    copy = sql.SQL("COPY {} ({}, _row_hash) FROM STDIN WITH (FORMAT csv, HEADER true)")
    if lists == "array":
        cur.execute(sql.SQL("CREATE TEMP TABLE _batch ({}, _row_hash text) ON COMMIT DROP").format(
            sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.type.sql))
                               for c in CONTRACT)))
        cur.copy_expert(copy.format(sql.Identifier("_batch"), column_list(COLUMNS)).as_string(cur), source)
        return
    cur.execute(sql.SQL("CREATE TEMP TABLE _stage ({}, _row_hash text) ON COMMIT DROP").format(
        sql.SQL(", ").join(sql.SQL("{} text").format(sql.Identifier(c)) for c in COLUMNS)))
    cur.copy_expert(copy.format(sql.Identifier("_stage"), column_list(COLUMNS)).as_string(cur), source)
    cur.execute(sql.SQL("CREATE TEMP TABLE _batch ON COMMIT DROP AS SELECT {} FROM _stage").format(_typed_select()))


@dataclass(frozen=True)
class MergeOptions:
    """What `merge` loads where, and how: the target `schema.table`, the run, the write mode and the
    load's guards (see `merge`). A bad mode, list format, run id or schema is refused here, before
    any SQL runs."""

    schema: str
    table: str
    run_id: str
    mode: str = "upsert"
    retire_missing: bool = True
    lock_timeout: str = LOAD_LOCK_TIMEOUT
    expected_fingerprint: str | None = None
    data_as_of: str | None = None
    allow_rewind: bool = False
    lists: str = "json"
    held: tuple[str, ...] = ()  # keys quarantined this run: never retired
    log_mode: str = ""  # the mode the load log records ('': `mode`; a publish records the run's own)

    def __post_init__(self) -> None:
        if self.mode not in WRITE_MODES:
            raise ValueError(f"write mode {self.mode!r} is not one of {', '.join(WRITE_MODES)}")
        if self.lists not in LIST_FORMATS:
            raise ValueError(f"list format {self.lists!r} is not one of {', '.join(LIST_FORMATS)}")
        names.run_id(self.run_id)
        names.schema(self.schema)


def merge(conn, csv_data, options: MergeOptions) -> dict:
    """Load a CSV (bytes or a binary file object: the contract columns then _row_hash), or the rows of
    a `TableSource`, into `schema.table` of `options` in ONE transaction: COPY (or select) into a
    temporary table, then merge. A CSV's list cells are JSON arrays (lists="json", the silver CSV) or
    PostgreSQL array literals (lists="array", what formats.copy_csv writes: COPY types them itself,
    no cast).

    upsert:  new keys inserted, changed rows updated (history: old version closed, new one opened),
             unchanged rows untouched; with retire_missing, keys absent from the batch are removed
             from the current table and their history closed, except the keys `held` (quarantined
             this run: the source still sends them), whose current version stays.
    append:  only keys not present yet are inserted; existing rows are never changed.
    replace: the current table becomes the batch (and the held keys): as upsert with retire_missing
             whatever it says; an unchanged row keeps its audit columns.
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
    schema, table, run_id, mode = options.schema, options.table, options.run_id, options.mode
    retire_missing, lock_timeout, lists = options.retire_missing, options.lock_timeout, options.lists
    expected_fingerprint, data_as_of = options.expected_fingerprint, options.data_as_of
    allow_rewind = options.allow_rewind
    target, hist, loads = ident(schema, table), ident(schema, history_table(table)), ident(schema, LOADS_TABLE)
    retire = mode == "replace" or (retire_missing and mode == "upsert")  # append never removes rows
    data_cols = column_list(COLUMNS)
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
                if retire:  # a key held in quarantine this run is still sent by the source: kept
                    cur.execute(sql.SQL(
                        "INSERT INTO _changes SELECT t.{k}, CASE WHEN t.{k} = ANY(%s) THEN 'held' ELSE 'retire' END "
                        "FROM {t} t WHERE NOT EXISTS (SELECT 1 FROM _batch b WHERE b.{k} = t.{k})").format(
                        k=sql.Identifier(KEY), t=target), (list(options.held),))
                cur.execute("SELECT key FROM _changes WHERE change = 'held' ORDER BY key LIMIT 1000")
                held_keys = [r[0] for r in cur.fetchall()]
                cur.execute("SELECT change, count(*) FROM _changes GROUP BY change")
                counts = {"insert": 0, "update": 0, "unchanged": 0, "retire": 0, "held": 0, **dict(cur.fetchall())}

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
                # Current rows: retired keys out, new and changed rows in. An unchanged row keeps its
                # audit columns: its `_run_id` stays the run that last changed it, as its history says.
                cur.execute(sql.SQL("DELETE FROM {t} WHERE {k} IN (SELECT key FROM _changes "
                                    "WHERE change = 'retire')").format(t=target, k=sql.Identifier(KEY)))
                written = ("insert", "update")
                updates = sql.SQL(", ").join(
                    sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c))
                    for c in [*COLUMNS[1:], *AUDIT_COLUMNS])
                # Only an updated key is still in the table: only then can a row conflict, the table
                # being locked against other writers.
                conflict = sql.SQL(" ON CONFLICT ({}) DO UPDATE SET {}").format(sql.Identifier(KEY), updates) \
                    if counts["update"] else sql.SQL("")
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
                    (run_id, table, options.log_mode or mode, counts["insert"], counts["update"], counts["unchanged"],
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
              "retired": counts["retire"], "held": counts["held"], "held_keys": held_keys, "current_rows": current, "mode": mode, "load_id": load_id,
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
    # A double compared by its bytes: -0.0 and 0.0 (equal as numbers) are different values sent.
    exact = sql.SQL(" OR ").join(
        (sql.SQL("float8send(t.{c}) IS DISTINCT FROM float8send(b.{c})") if c.kind == "double" else
         sql.SQL("t.{c} IS DISTINCT FROM b.{c}")).format(c=sql.Identifier(c.name)) for c in CONTRACT[1:])
    cur.execute(sql.SQL("SELECT b.{k} FROM _batch b LEFT JOIN {t} t ON t.{k} = b.{k} "
                        "WHERE t.{k} IS NULL OR {exact}").format(k=sql.Identifier(KEY), t=target, exact=exact))
    return sorted(r[0] for r in cur.fetchall())


def _table_fingerprints(cur, target) -> tuple[dict, dict, list[str]]:
    """One pass over the current table as it now stands in this transaction: the fingerprint of the
    batch's rows, of the whole table (both recomputed from the stored values), and the batch rows
    that `_changes` found equal to the batch (values and _row_hash) whose values do not give that
    _row_hash: drift that an equal row could not show before the write."""
    import pyarrow as pa  # late, as in lib.formats: only reading back needs Arrow
    import pyarrow.compute as pc

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
