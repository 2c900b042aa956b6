"""lib.db against the real embedded PostgreSQL: connections, the pipeline lock, a dead run's sessions."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from lib import db
from lib.config import Secret
from lib.db import DatabaseError, LockBusy
from tests.db_helpers import csv, load


def test_connect_with_a_wrong_password_fails_at_once_and_masks_it(settings):
    wrong = dataclasses.replace(settings.db, password=Secret("not-the-password"))
    started = time.monotonic()
    with pytest.raises(DatabaseError, match="password authentication failed") as err:
        db.connect(wrong)
    assert time.monotonic() - started < 3
    assert "not-the-password" not in str(err.value) and ":***@" in str(err.value)


def test_connect_retries_a_server_that_does_not_answer_then_names_it(settings, caplog):
    from tests.sinks import closed_port

    down = dataclasses.replace(settings.db, port=closed_port())
    with caplog.at_level("WARNING", logger="lib.db"):
        with pytest.raises(DatabaseError, match=f"cannot connect to PostgreSQL at .*:{down.port}/.*refused"):
            db.connect(down, attempts=3, backoff=0.01)
    retries = [r.getMessage() for r in caplog.records if "not answering" in r.getMessage()]
    assert len(retries) == 2  # three attempts: two waits


# --- the pipeline lock -------------------------------------------------------------------------------

def test_a_second_lock_attempt_names_the_holder(settings):
    with db.pipeline_lock(settings.db, "holder-run"):
        with pytest.raises(LockBusy, match="'countries-medallion run holder-run'"):
            with db.pipeline_lock(settings.db, "second-run"):
                pass
    with db.pipeline_lock(settings.db, "third-run"):  # released when the holder ended
        pass


def test_a_released_lock_is_free_for_the_next_run_at_once(settings):
    """The lock is released when the run ends, not when the server has ended its session a moment
    later: a run that starts right after (the next Airflow task, a resume) takes it without waiting.
    Seen from a session already open, so that nothing gives the server that moment."""
    watcher = db.connect(settings.db)
    watcher.autocommit = True
    try:
        with watcher.cursor() as cur:
            for i in range(40):
                with db.pipeline_lock(settings.db, f"run-{i}"):
                    pass
                cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s "
                            "AND objid = %s AND granted", db.LOCK_KEY)
                assert cur.fetchone()[0] == 0, f"still held after run-{i} released it"
                with db.pipeline_lock(settings.db, f"next-{i}"):  # wait_seconds=0: refused if still held
                    pass
    finally:
        watcher.close()


def test_waiting_for_the_lock_succeeds_once_the_holder_releases_it(settings):
    held, release = threading.Event(), threading.Event()

    def holder():
        with db.pipeline_lock(settings.db, "slow-run"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(10)
        threading.Timer(1.0, release.set).start()
        started = time.monotonic()
        with db.pipeline_lock(settings.db, "patient-run", wait_seconds=10):
            waited = time.monotonic() - started
        assert 0.9 <= waited < 5
    finally:
        release.set()
        thread.join(10)


# --- a killed run's session --------------------------------------------------------------------------

def test_ending_a_dead_runs_sessions_frees_its_locks_and_spares_the_others(settings, pg, clean, table,
                                                                            lingering, unique):
    run_id, dead = lingering
    other = db.connect(settings.db, application_name=f"countries-medallion 03_load other-{unique}")
    runner = db.connect(settings.db, application_name=f"countries-medallion run {run_id}")
    try:
        ended = db.end_run_sessions(settings.db, run_id)
        assert [(s["pid"], s["stage"]) for s in ended] == [(dead.get_backend_pid(), "03_load")]
        with pytest.raises(Exception):  # the dead run's session is gone ...
            dead.cursor().execute("SELECT 1")
        for alive in (other, runner, pg):  # ... the others are not
            with alive.cursor() as cur:
                cur.execute("SELECT 1")
        assert load(pg, csv(clean.head(5)), table, "r2", lock_timeout="5s")["current_rows"] == 5
        assert db.end_run_sessions(settings.db, run_id) == []
    finally:
        other.close()
        runner.close()
