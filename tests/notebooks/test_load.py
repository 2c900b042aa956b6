"""Stage notebooks 03-05 on real services: an identical rerun changes nothing, a changed source keeps
history and yields an exact change report, a load that dies half-way leaves the table as it was and
the run resumes, and export_all_tables brings the history and load-log tables to the cloud too."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pandas as pd
import psycopg2
from psycopg2 import sql

from lib import db, db_read, formats, storage
from tests.conftest import ROOT
from tests.notebooks.helpers import by_name, manifest, renamed, scalar, snapshot


def count(pg, schema: str, table: str) -> int:
    return scalar(pg, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table)))


def history(pg, schema: str, table: str) -> pd.DataFrame:
    return db_read.read_frame(pg, sql.SQL("SELECT * FROM {} ORDER BY version_id").format(
        sql.Identifier(schema, f"{table}_history")))


def gold_changes(s3, settings, run_id: str) -> dict:
    data, meta = storage.get_bytes(s3, settings.gold_bucket, f"changes/run_id={run_id}/changes.json")
    assert meta["run-id"] == run_id
    return json.loads(data)


def test_identical_rerun_changes_nothing_and_export_all_tables(run_pipeline, settings, s3, pg, unique):
    schema, table = f"s_{unique}", f"t_{unique}"
    first, second = f"same-{unique}-1", f"same-{unique}-2"
    common = ("--stages", "1-5", "-p", f"table={table}", "-p", f"db_schema={schema}")
    res = run_pipeline("--run-id", first, *common)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    before = db_read.current(pg, schema, table)
    history_before = history(pg, schema, table)
    cloud = storage.cloud_client(settings.cloud)
    prefix = f"{settings.cloud.prefix}/" if settings.cloud.prefix else ""
    # By default only the pipeline's table is exported.
    exported = [o["key"] for o in storage.list_objects(cloud, settings.cloud.bucket, prefix)
                if f"/run_id={first}/" in o["key"]]
    assert exported == [f"{prefix}{table}/run_id={first}/{table}.csv"]

    res = run_pipeline("--run-id", second, *common, "-p", "export_all_tables=true")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    m1, m2 = manifest(settings, first), manifest(settings, second)

    # 03_load of the second run touched nothing.
    load1, load2 = m1["stages"]["03_load"]["details"], m2["stages"]["03_load"]["details"]
    assert (load1["inserted"], load1["history_rows"]) == (250, 250)
    assert {k: load2[k] for k in ("inserted", "updated", "unchanged", "retired", "current_rows")} == \
        {"inserted": 0, "updated": 0, "unchanged": 250, "retired": 0, "current_rows": 250}
    assert load2["history_rows"] == load1["history_rows"] == 250
    assert load2["current_fingerprint"] == load1["current_fingerprint"]
    after = db_read.current(pg, schema, table)
    pd.testing.assert_frame_equal(after, before)  # same rows, same _run_id and _loaded_at: untouched
    assert after["name_common"].is_unique and set(after["_run_id"]) == {first}
    pd.testing.assert_frame_equal(history(pg, schema, table), history_before)
    hist = history_before
    assert len(hist) == 250 and hist["name_common"].is_unique and hist["is_current"].all()
    loads = db_read.read_frame(pg, sql.SQL("SELECT run_id, inserted, updated, unchanged, retired FROM {} "
                                           "ORDER BY loaded_at").format(sql.Identifier(schema, "pipeline_loads")))
    assert loads.values.tolist() == [[first, 250, 0, 0, 0], [second, 0, 0, 250, 0]]

    # The change report of the second run is empty.
    assert gold_changes(s3, settings, second) == {"previous_run_id": first, "added": [], "removed": [],
                                                  "changed": {}, "held": {}}
    assert m2["stages"]["05_gold"]["details"]["changes"] == {"added": 0, "removed": 0, "changed": 0, "held": 0}
    assert m2["stages"]["05_gold"]["details"]["previous_run_id"] == first

    # export_all_tables: the history and load-log tables are exported too, run-scoped and as latest.
    names_ = [table, f"{table}_history", "pipeline_loads"]
    exported = sorted(o["key"] for o in storage.list_objects(cloud, settings.cloud.bucket, prefix)
                      if f"/run_id={second}/" in o["key"])
    assert exported == sorted(f"{prefix}{n}/run_id={second}/{n}.csv" for n in names_)
    assert sorted(m2["stages"]["04_export"]["details"]["tables"]) == exported
    rows = {}
    for name in names_:
        key = f"{prefix}{name}/run_id={second}/{name}.csv"
        data, meta = storage.get_bytes(cloud, settings.cloud.bucket, key)
        latest, latest_meta = storage.get_bytes(cloud, settings.cloud.bucket,
                                                f"{prefix}{name}/latest/{name}.csv")
        assert latest == data and latest_meta["run-id"] == second
        assert meta["table"] == f"{schema}.{name}" and meta["sha256"] == storage.sha256(data)
        rows[name] = pd.read_csv(io.BytesIO(data))
        assert int(meta["rows"]) == len(rows[name])
    assert len(rows[table]) == 250 and len(rows[f"{table}_history"]) == 250
    assert sorted(rows[f"{table}_history"]["name_common"]) == sorted(before["name_common"])
    assert rows["pipeline_loads"]["run_id"].tolist() == [first, second]


def start_pipeline(*args: str) -> subprocess.Popen:
    """The command the run_pipeline fixture runs, started in the background."""
    return subprocess.Popen([sys.executable, str(ROOT / "run_pipeline.py"), *args], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def wait_for_blocked_load(pg, run_id: str, proc: subprocess.Popen, timeout: float = 120) -> int:
    """The pid of the 03_load backend of `run_id` once it waits on a lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with pg.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s "
                        "AND wait_event_type = 'Lock'", (f"countries-medallion 03_load {run_id}%",))
            found = cur.fetchone()
        if found:
            return found[0]
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (exit {proc.returncode}) before its load blocked:\n{out}\n{err}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the 03_load backend never waited on the table lock")


def test_changed_source_keeps_history_reports_changes_and_survives_a_killed_load(
        run_pipeline, settings, s3, pg, api, unique):
    table, first, second = f"t_{unique}", f"chg-{unique}-1", f"chg-{unique}-2"
    res = run_pipeline("--run-id", first, "--stages", "1-5", "-p", f"table={table}")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    before = db_read.current(pg, "public", table)
    history_rows = count(pg, "public", f"{table}_history")

    # The source changes: three populations, one country gone, one new.
    old = by_name(snapshot())
    records = snapshot()
    now = by_name(records)
    changed = {"Chile": 20_000_001, "Peru": 35_000_002, "Kenya": 60_000_003}
    for name, population in changed.items():
        now[name]["population"] = population
    records.remove(now["Aruba"])
    records.append(renamed(now["Fiji"], "Atlantis", population=12345))
    api.records = records
    res = run_pipeline("--run-id", second, "--stages", "1-2")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]

    # Stage 3 is killed half-way: it waits on a lock held here and its backend is terminated.
    locker = psycopg2.connect(**db.connect_args(settings.db, "countries-medallion test locker"))
    try:
        with locker.cursor() as cur:
            cur.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier("public", table)))
        proc = start_pipeline("--stages", "3-5", "--run-id", second, "-p", f"table={table}")
        pid = wait_for_blocked_load(pg, second, proc)
        assert scalar(pg, "SELECT pg_terminate_backend(%s)", (pid,))
    finally:
        locker.rollback()
        locker.close()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    assert "stage 03_load FAILED" in err and "rolled back" in err
    assert "server closed the connection" in err  # the real cause, not the failed rollback's "connection already closed"
    pd.testing.assert_frame_equal(db_read.current(pg, "public", table), before)
    assert count(pg, "public", f"{table}_history") == history_rows
    assert scalar(pg, "SELECT count(*) FROM public.pipeline_loads WHERE run_id = %s", (second,)) == 0
    m = manifest(settings, second)
    assert m["status"] == "failed" and m["stages"]["03_load"]["status"] == "failed"

    # Resuming finishes the run and loads the new data.
    res = run_pipeline("--resume", second)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    m = manifest(settings, second)
    assert m["status"] == "succeeded"
    assert [m["stages"][s]["status"] for s in ("03_load", "04_export", "05_gold")] == ["succeeded"] * 3
    assert m["stages"]["03_load"]["attempts"][0]["status"] == "failed"
    load = m["stages"]["03_load"]["details"]
    assert load["table"] == table
    assert {k: load[k] for k in ("inserted", "updated", "unchanged", "retired", "current_rows")} == \
        {"inserted": 1, "updated": 3, "unchanged": 246, "retired": 1, "current_rows": 250}
    assert load["history_rows"] == history_rows + 4

    current = db_read.current(pg, "public", table).set_index("name_common")
    assert "Aruba" not in current.index and current.at["Atlantis", "population"] == 12345
    for name, population in changed.items():
        assert current.at[name, "population"] == population
        assert current.at[name, "_run_id"] == second
    assert set(current["_run_id"]) == {first, second}

    # History keeps the old values: the table as the first run left it, and as the second did.
    as_first = db_read.as_of(pg, "public", table, first).set_index("name_common")
    as_second = db_read.as_of(pg, "public", table, second).set_index("name_common")
    assert len(as_first) == 250 and "Aruba" in as_first.index and "Atlantis" not in as_first.index
    assert len(as_second) == 250 and "Aruba" not in as_second.index and "Atlantis" in as_second.index
    for name, population in changed.items():
        assert as_first.at[name, "population"] == old[name]["population"]
        assert as_second.at[name, "population"] == population
    hist = history(pg, "public", table)
    assert len(hist) == history_rows + 4
    assert hist[hist["is_current"]]["name_common"].is_unique and hist["is_current"].sum() == 250
    closed = hist[~hist["is_current"]]
    assert sorted(closed["name_common"]) == sorted([*changed, "Aruba"]) and closed["valid_to"].notna().all()

    # The gold change report says exactly what changed, with old → new population.
    expected = {
        "previous_run_id": first,
        "added": ["Atlantis"],
        "removed": ["Aruba"],
        "changed": {name: {"population": [old[name]["population"], population]}
                    for name, population in sorted(changed.items())},
        "held": {},
    }
    assert gold_changes(s3, settings, second) == expected
    gold = m["stages"]["05_gold"]["details"]
    assert gold["changes"] == {"added": 1, "removed": 1, "changed": 3, "held": 0} and gold["previous_run_id"] == first
    exported = m["stages"]["04_export"]["objects"][0]
    cloud = storage.cloud_client(settings.cloud)
    frame = formats.CSV.decode(storage.get_bytes(cloud, exported["bucket"], exported["key"])[0])
    assert len(frame) == 250 and "Atlantis" in set(frame["name_common"])
