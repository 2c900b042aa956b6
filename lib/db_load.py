"""The load: a batch (CSV) into PostgreSQL in one transaction, COPY into a temporary table then merge
into the current table with history (SCD type 2), proven against the silver fingerprint before the
commit (`merge`); stage 3's half of it, the table as the run will publish it written to the run's
staging schema and proven there (`stage`), which the publish merges once; and the pipes that let a
COPY run while its rows are produced or parsed."""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass

import psycopg2
import psycopg2.errors
import psycopg2.extras
from psycopg2 import sql

from lib import db_hash, db_pipes, formats, names, quality
from lib.contract import CONTRACT, COLUMNS, KEY, LIST_COLUMNS
from lib.db import (LOADS_TABLE, WRITE_MODES, BatchMismatch, DatabaseError, RewindRefused, column_list, ident,
                    table_exists, transaction)
from lib.db_schema import (AUDIT_COLUMNS, HISTORY_COLUMNS, LOAD_COLUMNS, adopt, as_migrated, changes_table,
                            create_loads, create_table, ensure_tables, history_table, migrate)

log = logging.getLogger(__name__)

LOAD_LOCK_TIMEOUT = "60s"  # longest wait of a load for a lock held by another session
LOAD_WORK_MEM = "64MB"  # a load's work_mem (its joins and sorts over the batch; SET LOCAL)
LIST_FORMATS = ("json", "array")


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
    with db_pipes.streamed(lambda sink: cur.copy_expert(statement, sink)) as (stream, _):
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
    staged table, made by `stage`), which `merge` reads in SQL: its rows never pass through this
    process."""

    schema: str
    table: str


def _stage_batch(cur, csv_data, lists: str, into: sql.Identifier | None = None) -> bool:
    """The batch as the temporary table `_batch` (contract types, then _row_hash). With lists="array"
    (PostgreSQL array literals, as formats.copy_csv writes them) COPY types every cell itself; with
    lists="json" (the silver CSV) the rows are copied as text and cast, each JSON array unnested. A
    `TableSource` is selected from, typed already. `into` (a table of the contract's columns whose
    other columns have defaults): a batch of array literals is copied straight into it, and `_batch`
    reads it there. `_batch` is then a view, which the caller drops before the commit: returns
    whether it is one."""
    copy = sql.SQL("COPY {} ({}, _row_hash) FROM STDIN WITH (FORMAT csv, HEADER true)")
    if isinstance(csv_data, TableSource):  # read where it is, not copied
        into = ident(csv_data.schema, csv_data.table)
    else:
        source = csv_data if hasattr(csv_data, "read") else io.BytesIO(csv_data)
        if into is not None:
            cur.copy_expert(copy.format(into, column_list(COLUMNS)).as_string(cur), source)
    if into is not None:
        cur.execute(sql.SQL("CREATE TEMP VIEW _batch AS SELECT {}, _row_hash FROM {}").format(column_list(COLUMNS), into))
        return True
    if lists == "array":
        cur.execute(sql.SQL("CREATE TEMP TABLE _batch ({}, _row_hash text) ON COMMIT DROP").format(
            sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.type.sql))
                               for c in CONTRACT)))
        cur.copy_expert(copy.format(sql.Identifier("_batch"), column_list(COLUMNS)).as_string(cur), source)
        return False
    cur.execute(sql.SQL("CREATE TEMP TABLE _stage ({}, _row_hash text) ON COMMIT DROP").format(
        sql.SQL(", ").join(sql.SQL("{} text").format(sql.Identifier(c)) for c in COLUMNS)))
    cur.copy_expert(copy.format(sql.Identifier("_stage"), column_list(COLUMNS)).as_string(cur), source)
    cur.execute(sql.SQL("CREATE TEMP TABLE _batch ON COMMIT DROP AS SELECT {} FROM _stage").format(_typed_select()))
    return False


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
    # A `TableSource` staged by `stage`: its rows' checksum (`checksum`), which the table must hold
    # once merged, in place of reading the table back (`stage` proved those rows' values already).
    proven_checksum: str | None = None

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
    Before committing, the table is proven (`_proof`: each row hashed by PostgreSQL, a row it cannot
    be sure of read back and hashed here, in the same transaction): the
    fingerprint of the batch's rows, recomputed from the stored values, is compared with
    `expected_fingerprint` (stage 2's `clean_fingerprint`), any difference rolling the load back
    (the rows not stored as staged are named, compared in SQL, when that proof fails or is not
    given), and the whole table's fingerprint is returned as `current_fingerprint`. A batch that
    `stage` proved already (`proven_checksum`) is not read back: the table must hold exactly its
    rows (a checksum computed in PostgreSQL), and `expected_fingerprint` is then the table's. When
    the table does not exist yet, that staged table becomes it (`db_schema.adopt`): its rows keep
    the `_loaded_at` of their staging, as the run's export has them.
    `data_as_of` (when the batch's data was fetched) is kept in the load log; a batch older than
    the table's latest load is refused unless `allow_rewind`.
    On any error the transaction is rolled back and the tables are as they were. A lock held by another
    session (a killed run's, say) is waited for `lock_timeout` at most, then the load fails saying so.
    """
    schema, table, run_id, mode = options.schema, options.table, options.run_id, options.mode
    target, hist, loads = ident(schema, table), ident(schema, history_table(table)), ident(schema, LOADS_TABLE)
    data_cols = column_list(COLUMNS)
    with _rolled_back(options):
        with transaction(conn):
            with conn.cursor() as cur:
                _begin(cur, options)
                absent = [ident(schema, name) for name in (table, history_table(table))
                          if not table_exists(conn, schema, name)]
                # A first load of a staged, proven table: that table itself becomes the table, its rows
                # and key with it (lib/db_schema.py `adopt`), instead of being copied.
                adopted = isinstance(csv_data, TableSource) and options.proven_checksum is not None \
                    and csv_data.table == table and target in absent and adopt(cur, csv_data.schema, schema, table)
                ensure_tables(cur, schema, table)
                fresh = [t for t in absent if _created_here(cur, t) and not (adopted and t == target)]
                view = _stage_batch(cur, TableSource(schema, table) if adopted else csv_data, options.lists)
                cur.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(loads))
                # No other session writes the table until this one commits (readers go on): the rows
                # compared below are the rows written over, and a key found new stays new.
                cur.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(target))
                _refuse_rewind(cur, loads, schema, table, run_id, options.data_as_of, options.allow_rewind)
                counts, drift, held_keys = _plan(cur, options, None if adopted else target)

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
                if counts["retire"]:
                    cur.execute(sql.SQL("DELETE FROM {t} WHERE {k} IN (SELECT key FROM _changes "
                                        "WHERE change = 'retire')").format(t=target, k=sql.Identifier(KEY)))
                updates = sql.SQL(", ").join(
                    sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c))
                    for c in [*COLUMNS[1:], *AUDIT_COLUMNS])
                # Only an updated key is still in the table: only then can a row conflict, the table
                # being locked against other writers.
                conflict = sql.SQL(" ON CONFLICT ({}) DO UPDATE SET {}").format(sql.Identifier(KEY), updates) \
                    if counts["update"] else sql.SQL("")
                if not adopted:  # an adopted table holds its rows already
                    cur.execute(sql.SQL(
                        "INSERT INTO {t} ({cols}, _row_hash, _run_id, _loaded_at) "
                        "SELECT {cols}, _row_hash, %s, now() {rows}{conflict}").format(
                        t=target, cols=data_cols, rows=of_batch(("insert", "update")), conflict=conflict), (run_id,))
                _build_indexes(cur, indexes)
                if options.proven_checksum is not None and db_hash.checksum(cur, target) == options.proven_checksum:
                    # The table holds exactly the rows `stage` proved: their fingerprint is the one it recorded.
                    proven = {"rows": int(options.proven_checksum.split(":")[0]),
                              "fingerprint": options.expected_fingerprint}
                    batch_fp, current_fp, unproven = proven, proven, []
                else:
                    batch_fp, current_fp, unproven = _proof(cur, target, options.expected_fingerprint)
                    if options.proven_checksum is not None:  # and yet every row read back is as staged
                        raise BatchMismatch(f"{schema}.{table} does not hold the rows run {run_id} staged and "
                                            "proved (their checksum differs); rolled back")
                drift = sorted(set(drift) | set(unproven))
                load_id = _log_load(cur, loads, options, counts, len(drift))
                if view:
                    cur.execute("DROP VIEW _batch")
    result = _result(options, counts, held_keys, batch_fp, current_fp, drift, load_id=load_id)
    log.info("loaded %s.%s for run %s: %s", schema, table, run_id, result)
    return result


def stage(conn, csv_data, options: MergeOptions, staged: str) -> dict:
    """Stage 3's half of a load: the batch merged in thought, not in the table. In ONE transaction,
    the batch is copied into a temporary table, compared with `schema.table` as published (drift,
    the append guard and older data refused as `merge` does them), and the table as the run will
    publish it is written to `staged.table` (lib/db_schema.py `staging_schema`): the batch's rows,
    an unchanged row with its audit columns, and the published rows the run keeps (held keys; every
    absent key unless the mode retires it); beside it, `staged.<table>_changes` (each key's change)
    and `staged.pipeline_loads` (the load log with this load's row to come). That table is proven
    as `merge` proves a load (its batch rows' fingerprint, from the stored values, against `expected_fingerprint`)
    and its checksum returned, for the publish's one merge (`merge` with `proven_checksum`). The
    published tables are only read. Returns what `merge` returns, with `checksum` and without
    `load_id` (the publish writes the load log)."""
    schema, table, run_id = options.schema, options.table, options.run_id
    names.schema(staged)
    published, out = ident(schema, table), ident(staged, table)
    with _rolled_back(options):
        with transaction(conn):
            with conn.cursor() as cur:
                _begin(cur, options)
                exists = table_exists(conn, schema, table)
                if exists:  # read as the publish's migration will leave it (a new contract column: NULL)
                    published = as_migrated(cur, schema, table, AUDIT_COLUMNS)
                if table_exists(conn, schema, history_table(table)):  # refused now if it cannot be migrated
                    migrate(cur, schema, history_table(table), HISTORY_COLUMNS, dry_run=True)
                create_table(cur, staged, table)
                indexes = _drop_indexes(cur, [out])
                # A first load's table is the batch: copied straight into it, the run's audit columns
                # as its defaults.
                direct = not exists and options.lists == "array" and not isinstance(csv_data, TableSource)
                if direct:
                    cur.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN _run_id SET DEFAULT %s, "
                                        "ALTER COLUMN _loaded_at SET DEFAULT now()").format(out), (run_id,))
                view = _stage_batch(cur, csv_data, options.lists, into=out if direct else None)
                logged = table_exists(conn, schema, LOADS_TABLE)
                if logged:
                    _refuse_rewind(cur, ident(schema, LOADS_TABLE), schema, table, run_id, options.data_as_of,
                                   options.allow_rewind)
                counts, drift, held_keys = _plan(cur, options, published if exists else None)
                data_cols, key = column_list(COLUMNS), sql.Identifier(KEY)
                if exists:  # an unchanged row keeps the audit columns it has, as the publish will keep them
                    cur.execute(sql.SQL(
                        "INSERT INTO {out} ({cols}, _row_hash, _run_id, _loaded_at) "
                        "SELECT {bcols}, b._row_hash, CASE WHEN t.{k} IS NOT NULL AND c.change = 'unchanged' "
                        "THEN t._run_id ELSE %s END, CASE WHEN t.{k} IS NOT NULL AND c.change = 'unchanged' "
                        "THEN t._loaded_at ELSE now() END FROM _batch b JOIN _changes c ON c.key = b.{k} "
                        "LEFT JOIN {t} t ON t.{k} = b.{k}").format(
                        out=out, cols=data_cols, bcols=column_list(COLUMNS, "b"), k=key, t=published), (run_id,))
                    cur.execute(sql.SQL(
                        "INSERT INTO {out} ({cols}, _row_hash, _run_id, _loaded_at) "
                        "SELECT {cols}, _row_hash, _run_id, _loaded_at FROM {t} t "
                        "WHERE NOT EXISTS (SELECT 1 FROM _batch b WHERE b.{k} = t.{k}) AND NOT EXISTS "
                        "(SELECT 1 FROM _changes c WHERE c.key = t.{k} AND c.change = 'retire')").format(
                        out=out, cols=data_cols, t=published, k=key))
                elif not direct:
                    cur.execute(sql.SQL("INSERT INTO {out} ({cols}, _row_hash, _run_id, _loaded_at) "
                                        "SELECT {cols}, _row_hash, %s, now() FROM _batch").format(
                        out=out, cols=data_cols), (run_id,))
                _build_indexes(cur, indexes)  # a batch with a key twice fails here
                batch_fp, current_fp, unproven = _proof(cur, out, options.expected_fingerprint)
                drift = sorted(set(drift) | set(unproven))
                cur.execute(sql.SQL("CREATE TABLE {} AS SELECT key, change FROM _changes").format(
                    ident(staged, changes_table(table))))
                create_loads(cur, staged)
                if logged:
                    cur.execute(sql.SQL("INSERT INTO {} ({c}) SELECT {c} FROM {}").format(
                        ident(staged, LOADS_TABLE), ident(schema, LOADS_TABLE), c=column_list(LOAD_COLUMNS)))
                    cur.execute(sql.SQL("SELECT setval(pg_get_serial_sequence(%s, 'load_id'), "
                                        "coalesce(max(load_id), 0) + 1, false) FROM {}").format(
                        ident(staged, LOADS_TABLE)), (ident(staged, LOADS_TABLE).as_string(cur),))
                _log_load(cur, ident(staged, LOADS_TABLE), options, counts, len(drift))
                checksum = db_hash.checksum(cur, out)
                if view:
                    cur.execute("DROP VIEW _batch")
    result = _result(options, counts, held_keys, batch_fp, current_fp, drift, checksum=checksum)
    log.info("staged %s.%s for run %s in %s: %s", schema, table, run_id, staged, result)
    return result


def _begin(cur, options: MergeOptions) -> None:
    cur.execute("SET LOCAL lock_timeout = %s", (options.lock_timeout,))
    # Room for the batch's hash joins (this transaction only).
    cur.execute("SET LOCAL work_mem = %s", (LOAD_WORK_MEM,))


@contextlib.contextmanager
def _rolled_back(options: MergeOptions):
    """A load's errors as DatabaseError, saying that it was rolled back (and why)."""
    schema, table = options.schema, options.table
    try:
        yield
    except DatabaseError:
        raise
    except psycopg2.errors.LockNotAvailable:
        raise DatabaseError(
            f"loading {schema}.{table} waited {options.lock_timeout} for a lock held by another session and was "
            "rolled back: a killed run's session may still hold it (--resume ends the run's own sessions)"
        ) from None
    except psycopg2.Error as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        detail = getattr(getattr(err, "diag", None), "message_detail", None)  # which key, which row
        raise DatabaseError(f"loading {schema}.{table} failed and was rolled back: {first}"
                            + (f" ({detail.strip()})" if detail else "")) from None


def _plan(cur, options: MergeOptions, target: sql.Identifier | None) -> tuple[dict, list[str], list[str]]:
    """What the batch (`_batch`) changes in `target` (None: no table yet), as the temporary table
    `_changes` (key, change: insert, update, unchanged, retire or held); returns the counts of each,
    the keys whose stored row had drifted, and the first held keys. Append refuses a batch that
    would change a row."""
    schema, table, mode = options.schema, options.table, options.mode
    retire = mode == "replace" or (options.retire_missing and mode == "upsert")  # append never removes rows
    key = sql.Identifier(KEY)
    if target is None:
        cur.execute(sql.SQL("CREATE TEMP TABLE _changes ON COMMIT DROP AS "
                            "SELECT {k} AS key, 'insert'::text AS change FROM _batch").format(k=key))
        drift = []
    else:
        differs = sql.SQL(" OR ").join(
            sql.SQL("t.{c} IS DISTINCT FROM b.{c}").format(c=sql.Identifier(c)) for c in COLUMNS[1:])
        cur.execute(sql.SQL(
            "CREATE TEMP TABLE _changes ON COMMIT DROP AS "
            "SELECT b.{k} AS key, CASE WHEN t.{k} IS NULL THEN 'insert' "
            "WHEN {differs} OR t._row_hash IS DISTINCT FROM b._row_hash THEN 'update' "
            "ELSE 'unchanged' END AS change "
            "FROM _batch b LEFT JOIN {t} t ON t.{k} = b.{k}").format(k=key, t=target, differs=differs))
        # Drift: a row whose values no longer give the hash the pipeline stored with them. A row that
        # differs from the batch (in values or hash) is hashed here, before it is rewritten; a row
        # equal to the batch gives the batch's hash, checked once written (`_proof`).
        cur.execute("SELECT EXISTS (SELECT 1 FROM _changes WHERE change = 'update')")
        drift = _drifted(cur, sql.SQL(
            "SELECT {cols}, t._row_hash FROM {t} t JOIN _changes c ON c.key = t.{k} "
            "AND c.change = 'update'").format(cols=_list_json("t"), t=target, k=key)) if cur.fetchone()[0] else []
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
                k=key, t=target), (list(options.held),))
    cur.execute("SELECT key FROM _changes WHERE change = 'held' ORDER BY key LIMIT 1000")
    held_keys = [r[0] for r in cur.fetchall()]
    cur.execute("SELECT change, count(*) FROM _changes GROUP BY change")
    counts = {"insert": 0, "update": 0, "unchanged": 0, "retire": 0, "held": 0, **dict(cur.fetchall())}
    return counts, drift, held_keys


def _proof(cur, target, expected_fingerprint: str | None) -> tuple[dict, dict, list[str]]:
    """Audit before commit: the fingerprint of the batch's rows, recomputed from the stored values
    (`_table_fingerprints`), must be `expected_fingerprint` (the silver table's). Rows
    that are not stored as the batch has them are named (compared in SQL, doubles by their bits)
    whenever that proof is missing or fails. Returns the batch's and the table's fingerprints and
    the unproven rows (`_table_fingerprints`)."""
    batch_fp, current_fp, unproven = _table_fingerprints(cur, target)
    fingerprint = batch_fp["fingerprint"]
    if expected_fingerprint is None or fingerprint != expected_fingerprint:
        wrong = _not_as_sent(cur, target)
        if wrong:
            raise BatchMismatch(f"{len(wrong)} row(s) of the batch are not stored as sent: {_short(wrong)}; rolled back")
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise BatchMismatch(
            f"the {batch_fp['rows']} rows loaded have fingerprint {fingerprint[:16]}, the silver "
            f"record says {expected_fingerprint[:16]}: the batch is not the silver table; rolled back")
    return batch_fp, current_fp, unproven


def _log_load(cur, loads: sql.Identifier, options: MergeOptions, counts: dict, repaired: int) -> int:
    """The load's row in the load log; returns its load_id."""
    cur.execute(sql.SQL(
        "INSERT INTO {} (run_id, table_name, loaded_at, mode, inserted, updated, unchanged, retired, "
        "repaired, data_as_of) VALUES (%s, %s, now(), %s, %s, %s, %s, %s, %s, %s) RETURNING load_id").format(loads),
        (options.run_id, options.table, options.log_mode or options.mode, counts["insert"], counts["update"],
         counts["unchanged"], counts["retire"], repaired, options.data_as_of))
    return cur.fetchone()[0]


def _result(options: MergeOptions, counts: dict, held_keys: list[str], batch_fp: dict, current_fp: dict,
            drift: list[str], **extra) -> dict:
    """What `merge` and `stage` return (`extra`: the load id, or the staged table's checksum); drift is
    logged. Every drifted row is a row of the batch, stored (or staged) as the batch has it."""
    if drift:
        log.warning("%s.%s: %d row(s) had been changed outside the pipeline (%s); repaired", options.schema,
                    options.table, len(drift), _short(drift))
    return {"inserted": counts["insert"], "updated": counts["update"], "unchanged": counts["unchanged"],
            "retired": counts["retire"], "held": counts["held"], "held_keys": held_keys,
            "current_rows": current_fp["rows"], "mode": options.mode, **extra,
            "batch_rows": batch_fp["rows"], "batch_fingerprint": batch_fp["fingerprint"],
            "current_fingerprint": current_fp["fingerprint"],
            "drift": {"rows": len(drift), "keys": drift[:50], "repaired": len(drift)}}


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
    """The current table as it now stands in this transaction: the fingerprint of the batch's rows,
    of the whole table (both recomputed from the stored values), and the batch rows that `_changes`
    found equal to the batch (values and _row_hash) whose values do not give that _row_hash: drift
    that an equal row could not show before the write. PostgreSQL hashes every row (on its parallel
    workers) and sorts the lines the fingerprint is made of; only a row whose SQL hash is not its
    stored `_row_hash` is read back and hashed here, and its own hash used."""
    key = sql.Identifier(KEY)
    cur.execute("SET LOCAL extra_float_digits = 1")  # doubles in their shortest exact digits
    cur.execute(sql.SQL("CREATE TEMP TABLE _odd ON COMMIT DROP AS SELECT t.{k} AS key FROM {t} t "
                        "WHERE {h} IS DISTINCT FROM t._row_hash").format(k=key, t=target, h=db_hash.row_hash("t")))
    cur.execute("CREATE TEMP TABLE _exact (key text PRIMARY KEY, h text) ON COMMIT DROP")
    odd = sql.SQL("SELECT {cols}, t._row_hash FROM {t} t JOIN _odd o ON o.key = t.{k}").format(
        cols=_list_json("t"), t=target, k=key)
    cur.execute("SELECT EXISTS (SELECT 1 FROM _odd)")
    for rows, hashes in (_hashed_rows(cur, odd, {"_row_hash": "string"}) if cur.fetchone()[0] else ()):
        psycopg2.extras.execute_values(cur, "INSERT INTO _exact (key, h) VALUES %s",
                                       list(zip(rows.column(KEY).to_pylist(), hashes)))
    cur.execute(sql.SQL("SELECT e.key FROM _exact e JOIN {t} t ON t.{k} = e.key JOIN _changes c ON c.key = e.key "
                        "AND c.change = 'unchanged' WHERE e.h <> t._row_hash ORDER BY e.key").format(t=target, k=key))
    unproven = [r[0] for r in cur.fetchall()]
    batch_fp, current_fp = quality.SortedLines(), quality.SortedLines()
    with cur.connection.cursor(name="_fingerprint_lines") as lines:  # streamed, a slice at a time
        lines.itersize = 65_536
        lines.execute(sql.SQL(
            """SELECT (t.{k} || E'\\t' || coalesce(e.h, t._row_hash)) COLLATE "C" AS line, """
            "coalesce(c.change IN ('insert', 'update', 'unchanged'), false) FROM {t} t "
            "LEFT JOIN _changes c ON c.key = t.{k} LEFT JOIN _exact e ON e.key = t.{k} ORDER BY line").format(
            t=target, k=key))
        while rows := lines.fetchmany(lines.itersize):
            current_fp.add([line for line, _ in rows])
            batch_fp.add([line for line, in_batch in rows if in_batch])
    return batch_fp.result(), current_fp.result(), unproven


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
