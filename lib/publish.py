"""Publishing a proven run: what consumers read moves to it, in one fixed order.

- `run`: the runner publishes a run once every hop has reconciled, holding the lock, and once its
  record is stored whole in the records bucket (lib/record_store.py): the table from
  the run's staging copy, then `objects`: its `latest` copies (the cloud export, then the gold
  objects) and, written last, the table's pointer `_published/<table>.json` in the gold bucket (the
  published run, its gold table's key and the run published before it). `finish_pending` finishes
  a publish that was stopped half-way.
- `republish`: make an earlier proven run current again (a rollback, `run_pipeline.py publish
  RUN_ID`, under the pipeline lock): the table is restored to the state that run left (from the
  history, as a `replace` load of that run: recorded in `pipeline_loads` and the history like any
  load, and proven against the run's own fingerprint), then its objects are published as above.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone

from lib import (config, db, db_load, db_read, db_schema, formats, layout, names, quality, record_store, registry, runs,
                 storage)
from lib.contract import COLUMNS
from lib.errors import PipelineError
from lib.registry import Layer

log = logging.getLogger(__name__)


class PublishError(PipelineError):
    """A run that cannot be published; the message says why, and that nothing changed."""


def pointer(s3, bucket: str, table: str) -> dict | None:
    """The published pointer of a table, or None before its first publish."""
    if storage.head(s3, bucket, layout.published_key(table)) is None:
        return None
    return json.loads(storage.get_bytes(s3, bucket, layout.published_key(table))[0])


def latest_published(settings: config.Settings, table: str) -> str | None:
    """The run whose data is published for `table` (its pointer names it), None before its first
    publish: what a run that starts after stage 1 reads, unless it is told another run."""
    found = pointer(storage.client(settings.store), settings.gold_bucket, table)
    return found.get("run_id") if found else None


def _note(s3, settings: config.Settings, table: str, **what) -> None:
    """Write down what a publish moves, before its first step (`finish_pending` reads it)."""
    storage.put_bytes(s3, settings.gold_bucket, layout.pending_key(table), json.dumps({"table": table, **what},
                      indent=2).encode(), metadata=what["metadata"], content_type="application/json")


def _objects_of(exported: dict, gold: dict) -> tuple[list[dict], list[dict]]:
    """A run's objects to publish, from its export and gold stage records: the cloud export(s), and
    the gold objects with the gold table first."""
    gold_objects = sorted((a for a in gold["artifacts"] if "key" in a),
                          key=lambda a: a["key"] != gold["details"].get("gold_key"))
    return [a for a in exported["artifacts"] if a.get("role") == "cloud"], gold_objects


def _table(settings: config.Settings, run_id: str, loaded: dict) -> dict | None:
    """Step 1: the table becomes the run's staged state, in one transaction (the merge writes the
    history and the load log with it), proven against stage 3's fingerprint. A table published
    since the run staged it is not overwritten. Done already (a publish finished again): None."""
    details = loaded["details"]
    schema, table, staged = details["schema"], details["table"], details["staged_schema"]
    conn = db.connect(settings.db, application_name=f"countries-medallion publish {run_id}")
    try:
        with conn.cursor() as cur:
            latest = db_schema.latest_load(cur, schema, table)
            done = db_schema.loaded_since(cur, schema, table, run_id, details.get("staged_from_load"))
        conn.rollback()  # the reads' transaction ends: the load opens its own
        if done:  # this publish had committed the table before it stopped
            return None
        if latest != details.get("staged_from_load"):
            raise PublishError(f"{schema}.{table} was published again after run {run_id} staged it (load "
                               f"{latest}, staged from {details.get('staged_from_load')}): nothing of run {run_id} "
                               "was published; run it again")
        if not db.table_exists(conn, staged, table):
            raise PublishError(f"run {run_id}'s staged table {staged}.{table} is gone: nothing was published")
        conn.rollback()
        # The one merge of the run: its staged table, which stage 3 proved, in SQL (a table of any
        # size never passes through this process); the table must then hold exactly those rows.
        return db_load.merge(conn, db_load.TableSource(staged, table), db_load.MergeOptions(
            schema=schema, table=table, run_id=run_id, mode="replace", allow_rewind=True, log_mode=details.get("mode", ""),
            expected_fingerprint=details.get("current_fingerprint"), data_as_of=details.get("data_as_of"),
            proven_checksum=details.get("checksum")))
    except db.DatabaseError as err:
        raise PublishError(f"{schema}.{table} could not be published: {err}") from None
    finally:
        conn.close()


def run(settings: config.Settings, run_id: str) -> dict:
    """Publish a proven run, in a fixed order: what it moves is written down first
    (`layout.pending_key`); 1. the table (one transaction); 2. the `latest` copies; 3. the table's
    pointer, written last; then the note is removed and the staging copy dropped. Stopped at any
    step, it is finished by `finish_pending`. The caller holds the pipeline lock. Returns the table's
    load and the published URIs (also in the run's `published.json`, which the manifest derives from)."""
    loaded, exported, gold = _proven(settings, run_id)
    try:  # the run's record is whole in the records bucket before anything makes the run current
        record_store.push(settings, run_id, strict=True)
    except record_store.RecordStoreError as err:
        raise PublishError(f"{err}; nothing of run {run_id} was published") from None
    table = loaded["details"]["table"]
    export_objects, gold_objects = _objects_of(exported, gold)
    s3 = storage.client(settings.store)
    metadata = {"run-id": run_id, "stage": "publish"}
    storage.ensure_bucket(s3, settings.gold_bucket)
    _note(s3, settings, table, run_id=run_id, exported=export_objects, gold=gold_objects, metadata=metadata,
          with_table=True)
    result = _table(settings, run_id, loaded) if loaded["details"].get("staged_schema") else None
    published = objects(settings, run_id, table, export_objects, gold_objects, metadata, note=False)
    if loaded["details"].get("staged_schema"):
        conn = db.connect(settings.db, application_name=f"countries-medallion publish {run_id}")
        try:
            db_schema.drop_staging(conn, loaded["details"]["staged_schema"])
        finally:
            conn.close()
    _record_published(settings, run_id, published)
    storage.delete(s3, settings.gold_bucket, layout.pending_key(table))
    return {"run_id": run_id, "table": f"{loaded['details']['schema']}.{table}", "published": published,
            "load": result or {"inserted": 0, "updated": 0, "retired": 0}}


def _record_published(settings: config.Settings, run_id: str, published: list[str]) -> None:
    """What was published, in the run's `published.json` (the manifest derives from it; the stage
    records, stored once, stay as they ended). The publish of a run finished by another run is
    stored with it."""
    path = runs.run_dir(settings, run_id) / runs.PUBLISHED_FILE
    if runs.read_json(path) is None:
        runs.write_json(path, {"run_id": run_id, "published": published, "when": runs.now()})
    record_store.push(settings, run_id)


def objects(settings: config.Settings, run_id: str, table: str, exported: list[dict], gold: list[dict],
            metadata: dict, note: bool = True) -> list[str]:
    """Move the `latest` keys to a run's objects (its cloud export(s) `exported`, then its gold
    objects `gold`, the gold table first), then write the table's pointer naming the run. Returns
    the `latest` URIs. What it moves is written first (`layout.pending_key`) and removed once the pointer is written:
    a publish stopped half-way is finished by `finish_pending`, before anything else publishes
    (`note=False`: the caller writes and removes that note, around more steps of its own)."""
    s3 = storage.client(settings.store)
    if note:
        _note(s3, settings, table, run_id=run_id, exported=exported, gold=gold, metadata=metadata)
    moves = [(storage.cloud_client(settings.cloud), a) for a in exported
             if a.get("role") == "cloud" and layout.run_of(a["key"])]
    moves += [(s3, a) for a in gold]
    current = pointer(s3, settings.gold_bucket, table) or {}
    if current.get("run_id") == run_id:  # published again: the run it replaced stays the previous one
        previous = (current.get("previous_run_id"), current.get("previous_gold_key"))
    else:
        previous = (current.get("run_id"), current.get("gold_key"))
    published = []
    for client, artifact in moves:
        latest = layout.latest(artifact["key"])
        storage.copy(client, artifact["bucket"], artifact["key"], latest)
        # One `latest` per object whatever format it is written in: a copy in another format, left by
        # a run before a format change, would otherwise look current to readers.
        for stale in formats.other_format_keys(latest):
            storage.delete(client, artifact["bucket"], stale)
        published.append(f"s3://{artifact['bucket']}/{latest}")
    # Written last: the pointer names this run as the published one, and where its gold table is.
    storage.put_bytes(s3, settings.gold_bucket, layout.published_key(table), json.dumps({
        "table": table, "run_id": run_id, "gold_key": gold[0]["key"],
        "previous_run_id": previous[0], "previous_gold_key": previous[1], "published": published},
        indent=2).encode(), metadata=metadata, content_type="application/json")
    if note:
        storage.delete(s3, settings.gold_bucket, layout.pending_key(table))
    return published


STAGING_KEEP_DAYS = 7  # a run's staging copy that was never published is dropped after this many days


def drop_stale_staging(settings: config.Settings, days: float = STAGING_KEEP_DAYS) -> list[str]:
    """Drop the staging copies made more than `days` ago and never published (a failed or abandoned
    run's; a published run's is dropped by its publish). Call it holding the pipeline lock."""
    conn = db.connect(settings.db, application_name="countries-medallion staging cleanup")
    try:
        stale = db_schema.staged_before(conn, datetime.now(timezone.utc) - timedelta(days=days))
        for name in stale:
            db_schema.drop_staging(conn, name)
            log.info("dropped the staging copy %s (made more than %s days ago, never published)", name, days)
    finally:
        conn.close()
    return stale


def finish_pending(settings: config.Settings) -> list[dict]:
    """Finish every publish that was stopped before its pointer (a killed run, a full disk): its
    copies are made again and its pointer written, so readers of the pointers move to it whole. Call
    it holding the pipeline lock, before anything else publishes. Returns what was finished."""
    s3 = storage.client(settings.store)
    storage.ensure_bucket(s3, settings.gold_bucket)
    finished = []
    for found in storage.list_objects(s3, settings.gold_bucket, f"{layout.PUBLISHED}/"):
        if layout.pending_table(found["key"]) is None:
            continue
        pending = json.loads(storage.get_bytes(s3, settings.gold_bucket, found["key"])[0])
        record_store.pull(settings, pending["run_id"])  # its record, wherever the run was recorded
        if pending.get("with_table"):  # a whole publish: the table too, unless it was done already
            published = run(settings, pending["run_id"])["published"]
        else:
            published = objects(settings, pending["run_id"], pending["table"], pending["exported"],
                                pending["gold"], pending["metadata"])
        log.warning("the publish of run %s (table %s) had stopped before its pointer: finished now (%d objects)",
                    pending["run_id"], pending["table"], len(published))
        finished.append({"run_id": pending["run_id"], "table": pending["table"], "published": published})
    return finished


def _proven(settings: config.Settings, run_id: str) -> tuple[dict, dict, dict]:
    """The records of a run whose every hop reconciled: (load, export, gold) stage records."""
    stages = {}
    for layer in (Layer.TABLE, Layer.CLOUD, Layer.GOLD):
        name = registry.writer_of(layer).name
        stages[layer] = runs.read_stage(settings, run_id, name)
        if (stages[layer] or {}).get("status") != "succeeded":
            raise PublishError(f"run {run_id} has no succeeded {name} record: only a proven run can be published; "
                               "nothing was changed")
    gold = stages[Layer.GOLD]["details"]
    checked = gold.get("reconciliation") or []
    if gold.get("reconciliation_error") or not checked or any(r.get("status") == "MISMATCH" for r in checked):
        raise PublishError(f"run {run_id} did not reconcile: only a proven run can be published; nothing was changed")
    return stages[Layer.TABLE], stages[Layer.CLOUD], stages[Layer.GOLD]


def _present(clients: dict, artifacts: list[dict], run_id: str) -> None:
    """Every object to publish is still there, byte for byte what the run recorded (its sha256)."""
    for a in artifacts:
        found = storage.head(clients[a.get("role") == "cloud"], a["bucket"], a["key"])
        if found is None or found["metadata"].get("sha256") != a.get("sha256"):
            raise PublishError(f"s3://{a['bucket']}/{a['key']} of run {run_id} is "
                               f"{'gone' if found is None else 'not what the run wrote'}; nothing was changed")


def republish(settings: config.Settings, run_id: str) -> dict:
    """Make an earlier proven run the published one again: its table state, then its objects and
    pointer. The caller holds the pipeline lock. Returns what was done."""
    names.run_id(run_id)
    loaded, exported, gold = _proven(settings, run_id)
    schema, table = loaded["details"]["schema"], loaded["details"]["table"]
    staged = loaded["details"].get("staged_schema")
    conn = db.connect(settings.db, application_name=f"countries-medallion publish {run_id}")
    try:
        never_published = bool(staged) and db.table_exists(conn, staged, table)
    finally:
        conn.close()
    if never_published:  # a run that staged and proved, and was never published (a notebook run's)
        return run(settings, run_id)
    s3 = storage.client(settings.store)
    clients = {False: s3, True: storage.cloud_client(settings.cloud)}
    export_objects, gold_objects = _objects_of(exported, gold)
    _present(clients, export_objects + gold_objects, run_id)
    conn = db.connect(settings.db, application_name=f"countries-medallion publish {run_id}")
    try:
        state = db_read.as_of(conn, schema, table, run_id)[COLUMNS].reset_index(drop=True)
        conn.rollback()  # the read's transaction ends: the load opens its own
        state["_row_hash"] = quality.row_hashes(state)
        result = db_load.merge(conn, formats.CSV.encode(state), db_load.MergeOptions(
            schema=schema, table=table, run_id=run_id, mode="replace", allow_rewind=True,
            expected_fingerprint=loaded["details"].get("current_fingerprint")))
    except db.DatabaseError as err:
        raise PublishError(f"the table could not be restored to run {run_id}: {err}") from None
    finally:
        conn.close()
    if result["current_fingerprint"] != loaded["details"].get("current_fingerprint"):
        raise PublishError(f"{schema}.{table} restored to run {run_id} does not have the fingerprint it recorded")
    published = objects(settings, run_id, table, export_objects, gold_objects,
                        metadata={"run-id": run_id, "stage": "publish"})
    log.info("run %s published again: %s.%s restored (%d changed), %d objects", run_id, schema, table,
             result["inserted"] + result["updated"] + result["retired"], len(published))
    return {"run_id": run_id, "table": f"{schema}.{table}", "load": result, "published": published}
