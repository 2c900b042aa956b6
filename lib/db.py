"""PostgreSQL, the core every other db module builds on: connections, quoted identifiers,
transactions, the errors, and the pipeline's advisory lock (and ending a dead run's sessions).

db_schema creates and migrates the tables, db_load loads a batch into them, db_read reads and
exports them. Every identifier is validated (lib.names) and then quoted by psycopg2.sql.Identifier."""

from __future__ import annotations

import contextlib
import logging
import random
import time

from typing import TYPE_CHECKING

import psycopg2
import tenacity
from psycopg2 import sql

from lib import names
from lib.config import Database
from lib.errors import EXIT_LOCKED, PipelineError

if TYPE_CHECKING:  # SQLAlchemy is imported where it is used: the runner does not need it
    import sqlalchemy as sa

log = logging.getLogger(__name__)

WRITE_MODES = ("upsert", "append", "replace")
LOADS_TABLE = "pipeline_loads"
LOCK_KEY = (7420, 1)  # (namespace, id) of the pipeline's session advisory lock
APP_NAME = "countries-medallion"  # sessions are named "countries-medallion <stage> <run id>"


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

    exit_code = EXIT_LOCKED


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
    import sqlalchemy as sa  # late: the runner connects without SQLAlchemy

    return sa.create_engine(
        "postgresql+psycopg2://",
        creator=lambda: connect(db, application_name),
        poolclass=sa.pool.NullPool,
    )


def ident(*parts: str) -> sql.Identifier:
    for p in parts:
        names.sql_identifier(p)
    return sql.Identifier(*parts)


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


def column_list(names_: list[str] | tuple[str, ...], prefix: str | None = None) -> sql.Composed:
    if prefix:
        return sql.SQL(", ").join(sql.Identifier(prefix, n) for n in names_)
    return sql.SQL(", ").join(sql.Identifier(n) for n in names_)


def table_exists(conn, schema: str, table: str) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL",
                    (ident(schema, table).as_string(conn),))
        return cur.fetchone()[0]


# --- the pipeline lock -------------------------------------------------------------------------------

@contextlib.contextmanager
def pipeline_lock(db: Database, run_id: str, wait_seconds: float = 0.0):
    """Hold the session advisory lock for a whole run, so two runs against the same database (from
    any machine) never interleave. Waits up to `wait_seconds`, then raises LockBusy naming the holder."""
    conn = connect(db, application_name=f"countries-medallion run {run_id}")
    conn.autocommit = True
    deadline, held = time.monotonic() + wait_seconds, False
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
        held = True
        yield
    finally:
        # Released before the session closes: a closed session's locks go only when its server process
        # has ended, a moment later, and the next run (an Airflow task, a resume) would find it held.
        # A broken connection cannot say so: its session's end releases the lock.
        with contextlib.suppress(psycopg2.Error):
            if held:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s, %s)", LOCK_KEY)
        with contextlib.suppress(psycopg2.Error):
            conn.close()


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
