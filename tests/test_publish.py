"""lib.publish: an earlier proven run made current again (a rollback), its table state restored from
the history and recorded like any load, its objects and pointer published; refusals change nothing."""

from __future__ import annotations

import json

import pytest
from psycopg2 import sql

from lib import db, layout, publish, quality, runs, source, storage
from lib.stages import context, gold, parameters
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


def interrupted_publish(settings, run_id: str, table: str, monkeypatch) -> None:
    """Publish a run's objects again, stopped after its first copy (before its pointer)."""
    exported = runs.read_stage(settings, run_id, "04_export")["artifacts"]
    gold = [a for a in runs.read_stage(settings, run_id, "05_gold")["artifacts"] if "key" in a]
    copy, copies = storage.copy, []

    def copy_then_kill(*args, **kwargs):
        copies.append(args)
        copy(*args, **kwargs)
        raise Killed

    with monkeypatch.context() as m, pytest.raises(Killed):
        m.setattr(storage, "copy", copy_then_kill)
        publish.objects(settings, run_id, table, exported, gold, {"run-id": run_id})
    assert len(copies) == 1


def test_a_publish_stopped_before_its_pointer_is_finished_by_the_next_command(settings, s3, run_pipeline, unique,
                                                                             monkeypatch):
    table, first, second = f"pend_{unique}", f"pend-a-{unique}", f"pend-b-{unique}"
    run_stages(first, table)
    _, first_gold = latest_gold(settings, s3, table)
    run_stages(second, table)
    interrupted_publish(settings, first, table, monkeypatch)
    pointer = publish.pointer(s3, settings.gold_bucket, table)
    assert pointer["run_id"] == second  # readers of the pointer still see one run: the last whole publish
    assert storage.head(s3, settings.gold_bucket, layout.pending_key(table)) is not None

    finished = publish.finish_pending(settings)
    assert [(f["run_id"], f["table"]) for f in finished] == [(first, table)]
    pointer, gold = latest_gold(settings, s3, table)
    assert (pointer["run_id"], pointer["previous_run_id"]) == (first, second) and gold == first_gold
    assert storage.head(s3, settings.gold_bucket, layout.pending_key(table)) is None

    interrupted_publish(settings, second, table, monkeypatch)  # and the next run does it before anything else
    res = run_pipeline("--stages", "1", "--run-id", f"pend-c-{unique}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"finished the publish of run {second} (table {table}), stopped before its pointer" in res.stdout
    assert publish.pointer(s3, settings.gold_bucket, table)["run_id"] == second
    manifest = json.loads((runs.run_dir(settings, f"pend-c-{unique}") / "manifest.json").read_text())
    assert [f["run_id"] for f in manifest["finished_publishes"]] == [second]


# --- write, audit, publish: nothing consumers read changes before the publish --------------------------

def consumers_view(settings, s3, pg, table) -> tuple:
    """Everything a consumer reads of a table: its rows, history and load log byte for byte, and
    every `latest` object and pointer (keys and bytes)."""
    cloud = storage.cloud_client(settings.cloud)
    objects = []
    for client, bucket in ((s3, settings.gold_bucket), (cloud, settings.cloud.bucket)):
        for o in storage.list_objects(client, bucket):
            if "/latest/" in o["key"] or o["key"].startswith(layout.PUBLISHED):
                objects.append((bucket, o["key"], storage.get_bytes(client, bucket, o["key"])[0]))
    return dump(pg, table), sorted(objects)


def test_a_day_2_run_stopped_after_stage_4_or_failing_at_stage_5_changes_nothing_consumers_read(
        settings, s3, pg, api, unique):
    table = f"wap_{unique}"
    run_stages(f"wap-a-{unique}", table)
    before = consumers_view(settings, s3, pg, table)
    records = json.loads(source.snapshot_bytes())
    records[3]["population"] += 5
    api.records = records[1:]  # one country gone, one changed: a real day 2
    out = run_stages(f"wap-b-{unique}", table, upto=4)
    assert out["load"].result["updated"] == 1 and out["load"].result["retired"] == 1  # staged, proven
    assert consumers_view(settings, s3, pg, table) == before

    export = out["export"][0]  # the same run, its export tampered with: stage 5 refuses it
    cloud = storage.cloud_client(settings.cloud)
    data, meta = storage.get_bytes(cloud, export.bucket, export.key)
    cloud.put_object(Bucket=export.bucket, Key=export.key, Body=data.replace(b",", b";", 1), Metadata=meta)
    with pytest.raises(context.StageError, match="checksum mismatch"):
        gold.build(context.begin("05_gold", f"wap-b-{unique}", table=table))
    with pytest.raises(publish.PublishError):
        publish.run(settings, f"wap-b-{unique}")
    assert consumers_view(settings, s3, pg, table) == before


class Stop(BaseException):
    """Stands for a kill at one step of the publish."""


@pytest.mark.parametrize("step", ["before the table", "after the table", "during the copies", "before the pointer",
                                  "after the pointer"])
def test_a_publish_killed_at_any_step_leaves_pointer_readers_on_one_run_and_the_next_command_finishes_it(
        settings, s3, pg, api, unique, monkeypatch, step):
    table, first, second = f"kill_{unique}", f"kill-a-{unique}", f"kill-b-{unique}"
    run_stages(first, table)
    records = json.loads(source.snapshot_bytes())
    records[7]["population"] += 9
    api.records = records
    run_stages(second, table, upto=5, publish_run=False)
    staged = runs.read_stage(settings, second, "03_load")["details"]

    real_table, real_copy, real_put = publish._table, storage.copy, storage.put_bytes
    copies = []

    def stop_table(*a, **kw):
        if step == "after the table":
            real_table(*a, **kw)
        raise Stop

    def stop_copy(*a, **kw):
        copies.append(a)
        if len(copies) == 2:
            raise Stop
        return real_copy(*a, **kw)

    def stop_drop(*a, **kw):
        raise Stop

    def stop_pointer(s3_, bucket, key, *a, **kw):
        if key == layout.published_key(table):
            raise Stop
        return real_put(s3_, bucket, key, *a, **kw)

    with monkeypatch.context() as m:
        if step in ("before the table", "after the table"):
            m.setattr(publish, "_table", stop_table)
        elif step == "during the copies":
            m.setattr(storage, "copy", stop_copy)
        elif step == "after the pointer":
            m.setattr(publish.db_schema, "drop_staging", stop_drop)
        else:
            m.setattr(storage, "put_bytes", stop_pointer)
        with pytest.raises(Stop):
            publish.run(settings, second)
    # Readers of the pointer see one whole run: the previous one, or this one once its pointer is written.
    assert publish.pointer(s3, settings.gold_bucket, table)["run_id"] == (second if step == "after the pointer" else first)

    finished = publish.finish_pending(settings)  # what the next run or publish command does first
    assert [f["run_id"] for f in finished] == [second]
    assert publish.pointer(s3, settings.gold_bucket, table)["run_id"] == second
    assert table_state(pg, table)[0] == staged["current_fingerprint"]
    with pg.cursor() as cur:  # the table was published once, not twice
        cur.execute('SELECT count(*) FROM pipeline_loads WHERE table_name = %s AND run_id = %s', (table, second))
        assert cur.fetchone()[0] == 1
    assert not db.table_exists(pg, staged["staged_schema"], table)  # the staging copy is gone


def test_a_notebook_run_from_papermill_changes_nothing_consumers_read(settings, s3, pg, unique):
    import papermill

    from lib import registry

    table = f"nb_{unique}"
    run_stages(f"nb-a-{unique}", table)
    before = consumers_view(settings, s3, pg, table)
    run_id = f"papermill-nb-{unique}"
    for stage in registry.STAGES:
        given = {"run_id": run_id} | ({"table": table} if "table" in parameters.declared(stage.name) else {})
        papermill.execute_notebook(str(stage.notebook), str(settings.outputs_dir / f"{run_id}-{stage.name}.ipynb"),
                                   parameters=given, kernel_name="python3", progress_bar=False)
    assert runs.read_stage(settings, run_id, "05_gold")["status"] == "succeeded"
    assert consumers_view(settings, s3, pg, table) == before
    done = publish.republish(settings, run_id)  # publishing it is an explicit, locked step
    assert publish.pointer(s3, settings.gold_bucket, table)["run_id"] == run_id and done["published"]


def test_a_staging_copy_never_published_is_dropped_after_some_days(settings, pg, unique):
    run_id = f"stale-{unique}"
    run_stages(run_id, f"stale_{unique}", upto=4)  # staged, never published
    staged = runs.read_stage(settings, run_id, "03_load")["details"]["staged_schema"]
    assert staged not in publish.drop_stale_staging(settings)  # a fresh one stays
    with pg.cursor() as cur:
        cur.execute(f'COMMENT ON SCHEMA "{staged}" IS \'{{"staged": "2026-01-01T00:00:00+00:00"}}\'')
    assert staged in publish.drop_stale_staging(settings)
    assert not db.table_exists(pg, staged, f"stale_{unique}")
