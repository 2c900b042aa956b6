"""lib.publish: an earlier proven run made current again (a rollback), its table state restored from
the history and recorded like any load, its objects and pointer published; refusals change nothing."""

from __future__ import annotations

import json

import pytest
from psycopg2 import sql

from lib import db, layout, publish, quality, runs, source, storage
from tests.db_helpers import current, dump
from tests.stages.helpers import run_stages


def table_state(pg, table):
    frame = current(pg, table).reset_index()
    return quality.fingerprint(frame)["fingerprint"], len(frame)


def latest_gold(settings, s3, table):
    pointer = publish.pointer(s3, settings.gold_bucket, table)
    key = layout.latest(pointer["gold_key"])
    return pointer, storage.get_bytes(s3, settings.gold_bucket, key)[0]


def test_republishing_an_earlier_run_restores_its_table_objects_and_pointer(settings, s3, pg, api, unique):
    table, first, second = f"pub_{unique}", f"pub-a-{unique}", f"pub-b-{unique}"
    run_stages(first, table)
    loaded_first = runs.read_stage(settings, first, "03_load")["details"]
    _, first_gold = latest_gold(settings, s3, table)
    records = json.loads(source.snapshot_bytes())
    for r in records[:10]:
        r["population"] += 1000
    api.records = records[5:]  # five countries gone, ten changed
    run_stages(second, table)
    assert table_state(pg, table)[0] != loaded_first["current_fingerprint"]

    done = publish.republish(settings, first)
    assert table_state(pg, table) == (loaded_first["current_fingerprint"], loaded_first["current_rows"])
    pointer, gold = latest_gold(settings, s3, table)
    assert (pointer["run_id"], pointer["previous_run_id"]) == (first, second) and gold == first_gold
    assert done["load"]["retired"] == 0 and done["load"]["inserted"] == 5 and done["load"]["updated"] == 5
    with pg.cursor() as cur:  # recorded like any load: the load log and the history
        cur.execute(sql.SQL("SELECT run_id, mode FROM {} WHERE table_name = %s ORDER BY load_id").format(
            db.ident("public", "pipeline_loads")), (table,))
        assert cur.fetchall() == [(first, "upsert"), (second, "upsert"), (first, "replace")]
        cur.execute(sql.SQL("SELECT count(*) FROM {} WHERE is_current AND _run_id = %s").format(
            db.ident("public", f"{table}_history")), (first,))
        assert cur.fetchone()[0] == loaded_first["current_rows"]

    publish.republish(settings, second)  # and forward again
    assert latest_gold(settings, s3, table)[0]["run_id"] == second
    assert table_state(pg, table)[0] == runs.read_stage(settings, second, "03_load")["details"]["current_fingerprint"]


def test_a_run_that_did_not_reconcile_or_whose_objects_changed_is_refused_and_nothing_changes(
        settings, s3, pg, unique):
    table, good, partial = f"ref_{unique}", f"ref-a-{unique}", f"ref-b-{unique}"
    run_stages(good, table)
    run_stages(partial, table, upto=4)
    before = dump(pg, table), latest_gold(settings, s3, table)
    with pytest.raises(publish.PublishError, match=f"run {partial} has no succeeded 05_gold record.*nothing was changed"):
        publish.republish(settings, partial)
    gold = runs.read_stage(settings, good, "05_gold")
    victim = next(a for a in gold["artifacts"] if layout.is_gold_table(a["key"]))
    s3.put_object(Bucket=victim["bucket"], Key=victim["key"], Body=b"tampered", Metadata={"sha256": "0" * 64})
    with pytest.raises(publish.PublishError, match="not what the run wrote; nothing was changed"):
        publish.republish(settings, good)
    assert (dump(pg, table), latest_gold(settings, s3, table)) == before


def test_the_command_takes_the_lock_and_says_what_it_did(run_pipeline, settings, unique):
    table, run_id = f"cmd_{unique}", f"cmd-{unique}"
    run_stages(run_id, table)
    res = run_pipeline("publish", run_id)
    assert res.returncode == 0, res.stderr
    assert f"run {run_id} published: public.{table} restored (inserted 0, updated 0, retired 0)" in res.stdout
    with db.pipeline_lock(settings.db, "holder"):
        busy = run_pipeline("publish", run_id)
    assert busy.returncode == 3 and "holds the lock" in busy.stderr
    assert run_pipeline("publish", "../x").returncode == 2


class Killed(BaseException):
    """Stands for a kill between two copies of a publish."""


def interrupted_publish(settings, run_id: str, table: str) -> None:
    """Publish a run's objects again, stopped after its first copy (before its pointer)."""
    exported = runs.read_stage(settings, run_id, "04_export")["artifacts"]
    gold = [a for a in runs.read_stage(settings, run_id, "05_gold")["artifacts"] if "key" in a]

    def kill(published):
        raise Killed

    with pytest.raises(Killed):
        publish.objects(settings, run_id, table, exported, gold, {"run-id": run_id}, on_copy=kill)


def test_a_publish_stopped_before_its_pointer_is_finished_by_the_next_command(settings, s3, run_pipeline, unique):
    table, first, second = f"pend_{unique}", f"pend-a-{unique}", f"pend-b-{unique}"
    run_stages(first, table)
    _, first_gold = latest_gold(settings, s3, table)
    run_stages(second, table)
    interrupted_publish(settings, first, table)
    pointer = publish.pointer(s3, settings.gold_bucket, table)
    assert pointer["run_id"] == second  # readers of the pointer still see one run: the last whole publish
    assert storage.head(s3, settings.gold_bucket, layout.pending_key(table)) is not None

    finished = publish.finish_pending(settings)
    assert [(f["run_id"], f["table"]) for f in finished] == [(first, table)]
    pointer, gold = latest_gold(settings, s3, table)
    assert (pointer["run_id"], pointer["previous_run_id"]) == (first, second) and gold == first_gold
    assert storage.head(s3, settings.gold_bucket, layout.pending_key(table)) is None

    interrupted_publish(settings, second, table)  # and the next run does it before anything else
    res = run_pipeline("--stages", "1", "--run-id", f"pend-c-{unique}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"finished the publish of run {second} (table {table}), stopped before its pointer" in res.stdout
    assert publish.pointer(s3, settings.gold_bucket, table)["run_id"] == second
    manifest = json.loads((runs.run_dir(settings, f"pend-c-{unique}") / "manifest.json").read_text())
    assert [f["run_id"] for f in manifest["finished_publishes"]] == [second]
