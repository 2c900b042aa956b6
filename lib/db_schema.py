"""PostgreSQL DDL: the pipeline's table, its history table and the load log, created from the
contract, and an existing table migrated to the contract (or refused, saying what to do)."""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone

import psycopg2
from psycopg2 import sql

from lib import names
from lib.contract import CONTRACT, COLUMNS, KEY, column
from lib.db import LOADS_TABLE, ContractMismatch, DatabaseError, ident, table_exists, transaction

log = logging.getLogger(__name__)

AUDIT_COLUMNS = ("_row_hash", "_run_id", "_loaded_at")
HISTORY_COLUMNS = ("version_id", "_row_hash", "_run_id", "valid_from", "valid_to", "is_current")


def history_table(table: str) -> str:
    return names.sql_identifier(f"{table}_history", "history table name")


def changes_table(table: str) -> str:
    """The staging schema's table of what a run's load changes, key by key (lib/db_load.py `stage`)."""
    return names.sql_identifier(f"{table}_changes", "changes table name")


def _contract_columns(with_key: bool) -> sql.Composed:
    parts = []
    for c in CONTRACT:
        text = f"{{}} {c.type.sql}" + ("" if c.nullable else " NOT NULL")
        if c.name == KEY and with_key:
            text += " PRIMARY KEY"
        if c.check.sql:
            text += f" CHECK ({c.check.sql.format(column=c.name)})"
        parts.append(sql.SQL(text).format(sql.Identifier(c.name)))
    return sql.SQL(", ").join(parts)


def _columns_of(cur, schema: str, table: str) -> dict[str, tuple[str, bool]]:
    """An existing table's columns: name → (type as PostgreSQL prints it, NOT NULL)."""
    cur.execute("SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull FROM pg_attribute a "
                "WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
                (ident(schema, table).as_string(cur),))
    return {name: (kind, notnull) for name, kind, notnull in cur.fetchall()}


def migrate(cur, schema: str, table: str, extra: tuple[str, ...], dry_run: bool = False) -> list[str]:
    """Bring an existing table to the contract: a new nullable contract column is added; any other
    difference (a missing NOT NULL column, another type or nullability, a column the contract no
    longer has) is refused with what to do. `extra` are the table's own non-contract columns.
    Returns the columns added (with `dry_run`: the columns to add, the table left as it is)."""
    found = _columns_of(cur, schema, table)
    where = f"{schema}.{table}"
    problems, added = [], []
    for c in CONTRACT:
        wanted = c.type.sql
        if c.name not in found:
            if not c.nullable:
                problems.append(f"column {c.name} ({wanted} NOT NULL) is in the contract but not in {where}: "
                                "a NOT NULL column cannot be added to existing rows; make it nullable in "
                                "lib/contract.py, or load into a new table")
                continue
            if not dry_run:
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
    if added and not dry_run:
        log.info("added contract column(s) %s to %s", ", ".join(added), where)
    return added


def as_migrated(cur, schema: str, table: str, extra: tuple[str, ...]) -> sql.Composable:
    """An existing table as `migrate` would leave it, without changing it: the table itself, or a
    query of it with a NULL for each contract column it lacks (refused as `migrate` refuses)."""
    missing = migrate(cur, schema, table, extra, dry_run=True)
    if not missing:
        return ident(schema, table)
    return sql.SQL("(SELECT *, {} FROM {})").format(sql.SQL(", ").join(
        sql.SQL("NULL::{} AS {}").format(sql.SQL(column(name).type.sql), sql.Identifier(name)) for name in missing),
        ident(schema, table))


def staging_schema(run_id: str) -> str:
    """The schema where a run stages its table until it is published: a name no user schema has."""
    return "stage_" + hashlib.sha256(names.run_id(run_id).encode()).hexdigest()[:16]


def stage(conn, schema: str, table: str, staged: str) -> int | None:
    """A run's staging schema `staged`, made again from scratch (empty: lib/db_load.py `stage` fills
    it with the table as the run will publish it). Consumers read the tables in `schema`, untouched.
    Returns the table's latest load id now (None: no load yet), which the publish checks again: a
    table published meanwhile is not overwritten. Raises DatabaseError (nothing staged) on any error."""
    try:
        return _stage(conn, schema, table, staged)
    except psycopg2.Error as err:
        raise DatabaseError(f"staging {schema}.{table} failed and was rolled back: {err}".strip()) from None


def _stage(conn, schema: str, table: str, staged: str) -> int | None:
    with transaction(conn), conn.cursor() as cur:
        cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ident(staged)))
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(ident(staged)))
        # When it was made: a staging copy a run never published is dropped after some days (`staged_before`).
        cur.execute(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(ident(staged), sql.Literal(json.dumps(
            {"staged": datetime.now(timezone.utc).isoformat()}))))
        if not table_exists(conn, schema, table):
            return None
        return latest_load(cur, schema, table)


def latest_load(cur, schema: str, table: str) -> int | None:
    if not table_exists(cur.connection, schema, LOADS_TABLE):
        return None
    cur.execute(sql.SQL("SELECT max(load_id) FROM {} WHERE table_name = %s").format(ident(schema, LOADS_TABLE)),
                (table,))
    return cur.fetchone()[0]


def loaded_since(cur, schema: str, table: str, run_id: str, since: int | None) -> bool:
    """Whether run `run_id` loaded the table after load `since` (None: ever)."""
    if not table_exists(cur.connection, schema, LOADS_TABLE):
        return False
    cur.execute(sql.SQL("SELECT 1 FROM {} WHERE table_name = %s AND run_id = %s AND load_id > %s").format(
        ident(schema, LOADS_TABLE)), (table, run_id, since or 0))
    return cur.fetchone() is not None


def staged_before(conn, when: datetime) -> list[str]:
    """The staging schemas made before `when` (by their comment), oldest first."""
    with conn.cursor() as cur:
        cur.execute("SELECT nspname, obj_description(oid, 'pg_namespace') FROM pg_namespace "
                    "WHERE nspname LIKE 'stage\\_%' ORDER BY nspname")
        found = []
        for name, comment in cur.fetchall():
            try:
                staged = datetime.fromisoformat(json.loads(comment or "{}")["staged"])
            except (ValueError, KeyError, TypeError):
                continue
            if staged < when:
                found.append((staged, name))
    conn.rollback()
    return [name for _, name in sorted(found)]


def drop_staging(conn, staged: str) -> None:
    with transaction(conn), conn.cursor() as cur:
        cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ident(staged)))


# What a default privilege may grant on a table (pg_default_acl, objtype 'r').
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "MAINTAIN")


def adopt(cur, staged: str, schema: str, table: str) -> bool:
    """Make `staged.table` (made by `create_table`) the table `schema.table`, which does not exist yet,
    as if it had been created there: moved with its rows and indexes (nothing is copied), its column
    defaults dropped, and granted what `schema`'s default privileges give a new table of its owner
    (the defaults of every schema it got when it was made). Returns False, and changes nothing,
    when one of its index names is taken in `schema`, or this session's role may not move it (not
    its owner's member): the caller copies the rows instead."""
    source = ident(staged, table)
    cur.execute("SELECT NOT pg_has_role(c.relowner, 'MEMBER') OR EXISTS (SELECT 1 FROM pg_index i "
                "JOIN pg_class x ON x.oid = i.indexrelid WHERE i.indrelid = c.oid "
                "AND to_regclass(quote_ident(%s) || '.' || quote_ident(x.relname)) IS NOT NULL) "
                "FROM pg_class c WHERE c.oid = to_regclass(%s)", (schema, source.as_string(cur)))
    refused = cur.fetchone()
    if refused is None or refused[0]:  # (no such table: the caller's copy says so)
        return False
    cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident(schema)))
    cur.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN _run_id DROP DEFAULT, ALTER COLUMN _loaded_at DROP DEFAULT").format(
        source))
    cur.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(source, ident(schema)))
    cur.execute("SELECT a.privilege_type, CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END, "
                "a.is_grantable FROM pg_default_acl d CROSS JOIN aclexplode(d.defaclacl) a "
                "WHERE d.defaclobjtype = 'r' AND d.defaclnamespace = to_regnamespace(%s) "
                "AND d.defaclrole = (SELECT relowner FROM pg_class WHERE oid = to_regclass(%s))",
                (ident(schema).as_string(cur), ident(schema, table).as_string(cur)))
    for privilege, grantee, grantable in cur.fetchall():
        if privilege not in TABLE_PRIVILEGES:
            raise DatabaseError(f"default privilege {privilege!r} of schema {schema} is not one a table takes")
        cur.execute(sql.SQL("GRANT {} ON {} TO {}{}").format(
            sql.SQL(privilege), ident(schema, table), sql.Identifier(grantee) if grantee else sql.SQL("PUBLIC"),
            sql.SQL(" WITH GRANT OPTION" if grantable else "")))
    return True


def create_table(cur, schema: str, table: str) -> None:
    """The pipeline's current table (the contract's columns, keyed, then the audit columns)."""
    cur.execute(sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} ({}, _row_hash text NOT NULL, _run_id text NOT NULL, "
        "_loaded_at timestamptz NOT NULL)").format(ident(schema, table), _contract_columns(True)))


# The load log's columns, in the order of its DDL (`create_loads`).
LOAD_COLUMNS = ("load_id", "run_id", "table_name", "loaded_at", "mode", "inserted", "updated", "unchanged",
                "retired", "repaired", "data_as_of")


def create_loads(cur, schema: str) -> None:
    """The load log: one row per load (`LOAD_COLUMNS`)."""
    cur.execute(sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (load_id bigserial PRIMARY KEY, run_id text NOT NULL, "
        "table_name text NOT NULL, loaded_at timestamptz NOT NULL, mode text NOT NULL, "
        "inserted integer NOT NULL, updated integer NOT NULL, unchanged integer NOT NULL, "
        "retired integer NOT NULL, repaired integer NOT NULL DEFAULT 0, data_as_of timestamptz)").format(
        ident(schema, LOADS_TABLE)))


def ensure_tables(cur, schema: str, table: str) -> None:
    hist = history_table(table)
    cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident(schema)))
    create_table(cur, schema, table)
    cur.execute(sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (version_id bigserial PRIMARY KEY, {}, _row_hash text NOT NULL, "
        "_run_id text NOT NULL, valid_from timestamptz NOT NULL, valid_to timestamptz, "
        "is_current boolean NOT NULL)").format(ident(schema, hist), _contract_columns(False)))
    cur.execute(sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} ({}) WHERE is_current").format(
        ident(f"{hist}_current"[:63]), ident(schema, hist), sql.Identifier(KEY)))
    create_loads(cur, schema)
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

