"""Write, audit, publish through `run_pipeline.py`, with tampering done for real between stages (boto3
on the object store, SQL on PostgreSQL): every stage checks its input against the record of the stage
that wrote it, nothing `latest` moves before the whole run has reconciled, a failed run says what it
left behind, and a load never takes the table back in time unless asked to."""

from __future__ import annotations

import pandas as pd
from psycopg2 import sql

from lib import db, db_read, formats, layout, storage
from tests.notebooks.helpers import manifest, scalar
from tests.record_helpers import alter_stage


def ok(res):
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]


def clean_object(settings, run_id: str) -> dict:
    return next(o for o in manifest(settings, run_id)["stages"]["02_clean"]["objects"] if layout.is_clean(o["key"]))


def test_stage_3_refuses_a_silver_object_changed_after_stage_2(run_pipeline, settings, s3, pg, unique):
    table, run_id = f"t_{unique}", f"wap-silver-{unique}"
    ok(run_pipeline("--run-id", run_id, "--stages", "1-2"))
    obj = clean_object(settings, run_id)
    data, meta = storage.get_bytes(s3, obj["bucket"], obj["key"])
    frame = formats.of_key(obj["key"]).decode(data)
    frame.loc[frame["name_common"] == "Chile", "population"] = 1
    forged = formats.of_key(obj["key"]).encode(frame)

    # 1. The bytes change, the metadata is kept: the object's own sha256 gives it away.
    s3.put_object(Bucket=obj["bucket"], Key=obj["key"], Body=forged, Metadata=meta)
    res = run_pipeline("--run-id", run_id, "--stages", "3-5", "-p", f"table={table}")
    assert res.returncode == 1 and "stage 03_load FAILED" in res.stderr
    assert "checksum mismatch" in res.stderr and "object's metadata" in res.stderr
    # 2. The metadata is forged too: stage 2's record still knows the real sha256.
    s3.put_object(Bucket=obj["bucket"], Key=obj["key"], Body=forged,
                  Metadata={**meta, "sha256": storage.sha256(forged)})
    res = run_pipeline("--run-id", run_id, "--stages", "3-5", "-p", f"table={table}", "-p", "write_mode=append")
    assert res.returncode == 1 and f"the 02_clean record of run {run_id}" in res.stderr
    assert not db.table_exists(pg, "public", table)  # nothing loaded, in any mode
    saved = manifest(settings, run_id)
    assert saved["status"] == "failed" and len(saved["stages"]["03_load"]["attempts"]) == 1
    assert saved["stages"]["03_load"]["status"] == "failed"


def test_a_run_that_fails_reconciliation_publishes_nothing_and_says_what_it_left(
        run_pipeline, settings, s3, unique):
    table, good, bad = f"t_{unique}", f"wap-good-{unique}", f"wap-bad-{unique}"
    ok(run_pipeline("--run-id", good, "-p", f"table={table}"))
    cloud = storage.cloud_client(settings.cloud)
    export_key = layout.export_key(settings.cloud.prefix, table, good)
    latest_export = layout.latest(export_key)
    latest_gold = layout.latest(layout.gold_table_key(table, good, formats.DEFAULT_GOLD))
    published = manifest(settings, good)["published"]
    assert f"s3://{settings.cloud.bucket}/{latest_export}" in published
    assert f"s3://{settings.gold_bucket}/{latest_gold}" in published and manifest(settings, good)["unpublished"] == []

    # Stage 4 of the next run writes its export but moves no `latest` key.
    ok(run_pipeline("--run-id", bad, "--stages", "1-4", "-p", f"table={table}"))
    assert storage.head(cloud, settings.cloud.bucket, latest_export)["metadata"]["run-id"] == good
    # The load's record is altered between stages 4 and 5 (as a lost row would show).
    alter_stage(settings, bad, "03_load", lambda record: record["details"].update(
        batch_rows=record["details"]["batch_rows"] - 1))

    res = run_pipeline("--run-id", bad, "--stages", "5", "-p", f"table={table}")
    assert res.returncode == 1 and "reconciliation failed" in res.stderr
    # Consumers still see the good run.
    assert storage.head(cloud, settings.cloud.bucket, latest_export)["metadata"]["run-id"] == good
    assert storage.head(s3, settings.gold_bucket, latest_gold)["metadata"]["run-id"] == good
    saved = manifest(settings, bad)
    assert saved["status"] == "failed" and saved["published"] == []
    table_ = pd.DataFrame(saved["reconciliation"])  # the table, not only an error string
    assert list(table_.columns) == ["hop", "records", "fingerprint", "compared with", "status"]
    assert table_.set_index("hop").at["PostgreSQL rows of this batch", "status"] == "MISMATCH"
    assert "PostgreSQL rows of this batch" in saved["reconciliation_error"]
    # Every object the failed run wrote is listed as unpublished, its gold objects included.
    gold_written = [o["key"] for o in storage.list_objects(s3, settings.gold_bucket) if f"/run_id={bad}/" in o["key"]]
    assert gold_written
    for key in gold_written:
        assert f"s3://{settings.gold_bucket}/{key}" in saved["unpublished"]
    assert f"s3://{settings.cloud.bucket}/{layout.export_key(settings.cloud.prefix, table, bad)}" in saved["unpublished"]


def test_a_row_edited_in_postgresql_is_repaired_by_upsert_and_refused_by_append(run_pipeline, settings, pg, unique):
    table, first, second, third = f"t_{unique}", f"drift-{unique}-1", f"drift-{unique}-2", f"drift-{unique}-3"
    ok(run_pipeline("--run-id", first, "-p", f"table={table}"))
    edit = sql.SQL("UPDATE {} SET population = 1 WHERE name_common = 'Chile'").format(sql.Identifier("public", table))
    with pg.cursor() as cur:
        cur.execute(edit)

    # Append keeps existing rows, so it cannot bring Chile back: refused, naming the row.
    res = run_pipeline("--run-id", second, "-p", f"table={table}", "-p", "write_mode=append")
    assert res.returncode == 1 and "stage 03_load FAILED" in res.stderr and "'Chile'" in res.stderr
    assert scalar(pg, sql.SQL("SELECT population FROM {} WHERE name_common = 'Chile'").format(
        sql.Identifier("public", table))) == 1

    # Upsert repairs it and the record says so; the run reconciles.
    ok(run_pipeline("--run-id", third, "-p", f"table={table}"))
    load = manifest(settings, third)["stages"]["03_load"]["details"]
    assert load["drift"] == {"rows": 1, "keys": ["Chile"], "repaired": 1}
    assert (load["updated"], load["unchanged"]) == (1, 249)
    assert scalar(pg, sql.SQL("SELECT population FROM {} WHERE name_common = 'Chile'").format(
        sql.Identifier("public", table))) > 1


def test_loading_an_older_run_over_newer_data_needs_allow_rewind(run_pipeline, settings, pg, api, unique):
    table, old, new = f"t_{unique}", f"rew-{unique}-old", f"rew-{unique}-new"
    ok(run_pipeline("--run-id", old, "-p", f"table={table}"))
    api.records[0]["population"] += 1
    ok(run_pipeline("--run-id", new, "-p", f"table={table}"))
    before = db_read.current(pg, "public", table)

    res = run_pipeline("--run-id", old, "--stages", "3-5", "-p", f"table={table}")
    assert res.returncode == 1 and "back in time" in res.stderr and "allow_rewind=true" in res.stderr
    pd.testing.assert_frame_equal(db_read.current(pg, "public", table), before)

    ok(run_pipeline("--run-id", old, "--stages", "3-5", "-p", f"table={table}", "-p", "allow_rewind=true"))
    loads = db_read.read_frame(pg, sql.SQL("SELECT run_id FROM {} WHERE table_name = %s ORDER BY load_id").format(
        sql.Identifier("public", "pipeline_loads")), (table,))
    assert loads["run_id"].tolist() == [old, new, old]  # every load has its own row
    # as_of reaches the state after each load, the rewind included.
    changed = api.records[0]["name"]["common"]
    assert db_read.as_of(pg, "public", table, new).set_index("name_common").at[changed, "population"] == \
        api.records[0]["population"]
    assert db_read.as_of(pg, "public", table, old).set_index("name_common").at[changed, "population"] == \
        api.records[0]["population"] - 1
    saved = manifest(settings, old)
    assert [a["status"] for a in saved["stages"]["03_load"]["attempts"]] == ["succeeded", "failed"]
    assert saved["stages"]["03_load"]["details"]["allow_rewind"] is True
