"""Stage 3: clean → the PostgreSQL table, merged with history."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from lib import contract, db, db_load, db_pipes, db_read, formats, layout, registry, storage
from lib.db_schema import changes_table, history_table, staging_schema
from lib.db_schema import stage as stage_table
from lib.registry import Layer
from lib.stages.context import StageError, StageRun, database_uri, run_objects, verify_input


@dataclass
class Loaded:
    result: dict
    preview: pd.DataFrame  # the first current rows by key (the table itself is never read whole)
    current_rows: int
    history_rows: int


def clean_object(stage: StageRun, s3) -> dict:
    """The silver table this load reads: the one stage 2's record lists (in this run, or the run an
    interactive run is based on); without a record, the run's newest clean object."""
    record = stage.previous_record(Layer.CLEAN)
    if record is not None:
        listed = [a for a in record.get("artifacts", []) if layout.is_clean(a.get("key", ""))]
        if listed:
            return {"key": listed[-1]["key"]}
    run = stage.input_run(Layer.CLEAN)
    found = [o for o in run_objects(s3, stage.settings.clean_bucket, run) if layout.is_clean(o["key"])]
    if not found:
        raise StageError(f"no clean object for run {run} in bucket {stage.settings.clean_bucket!r}: "
                         f"run {registry.writer_of(Layer.CLEAN).name} first")
    return found[-1]


def quarantined(stage: StageRun, s3) -> dict[str, str]:
    """The keys stage 2 quarantined in the run this load reads, with their reasons, from its
    quarantine object (proven against stage 2's record): they are held, not retired."""
    record = stage.previous_record(Layer.CLEAN) or {}
    objects = [a for a in record.get("artifacts", []) if layout.is_quarantine(a.get("key", ""))]
    if not objects:
        return {}
    data, _ = verify_input(stage, s3, objects[-1]["bucket"], objects[-1]["key"], Layer.CLEAN)
    rows = formats.of_key(objects[-1]["key"]).read(data)
    if not len(rows):
        return {}
    # A key PostgreSQL cannot store (a NUL) is in no table: there is nothing to hold.
    return {k: r for k, r in zip(rows[contract.KEY].tolist(), rows["reasons"].tolist())
            if isinstance(k, str) and k and "\x00" not in k}


def versions(stage: StageRun, country: str) -> pd.DataFrame:
    """Every recorded version of one country, oldest first, as the history will hold them once this
    run is published (the published history with this run's staged change; the table's own history
    once the staging copy is gone)."""
    p, staged = stage.params, staging_schema(stage.run_id)
    conn = stage.db_connection()
    try:
        if db.table_exists(conn, staged, changes_table(p.table)):
            return db_read.versions_after(conn, p.db_schema, p.table, staged, country)
    finally:
        conn.close()
    return db_read.versions(db.engine(stage.settings.db), p.db_schema, p.table, country)


def run(stage: StageRun) -> Loaded:
    """Stage the run's silver table: the table as the run will publish it, in the run's staging schema
    (lib/db_schema.py `stage`, then lib/db_load.py `stage`: one transaction, the published tables only
    read): the table consumers read changes only when the whole run is proven and published, by the
    run's one merge (lib/publish.py). The silver object is checked against stage 2's record first;
    inside the transaction the rows as stored are compared with stage 2's fingerprint, and a mismatch
    rolls the load back. Loading data older than the table's latest load needs allow_rewind=true."""
    settings, p = stage.settings, stage.params
    db_schema, table = p.db_schema, p.table
    s3 = storage.client(settings.store)
    obj = clean_object(stage, s3)
    data, _ = verify_input(stage, s3, settings.clean_bucket, obj["key"], Layer.CLEAN)
    cleaned = stage.previous_record(Layer.CLEAN)["details"]
    held = quarantined(stage, s3)
    fmt = formats.of_key(obj["key"])
    conn = stage.db_connection()
    staged = staging_schema(stage.run_id)
    try:
        try:
            base = stage_table(conn, db_schema, table, staged)
        except db.DatabaseError as err:
            raise StageError(str(err)) from None
        # The CSV that COPY reads, converted in Arrow batches by a thread while PostgreSQL copies the
        # previous ones (a conversion error fails the COPY, so nothing is loaded).
        with db_pipes.fed(lambda sink: formats.copy_csv(data, fmt.name, sink)) as (csv_rows, converted):
            try:
                # The table as the run will publish it is staged and proven: the batch's rows, hashed
                # as stored, against stage 2's fingerprint; the whole table's recomputed from its values.
                result = db_load.stage(conn, csv_rows, db_load.MergeOptions(
                    schema=db_schema, table=table, run_id=stage.run_id, mode=p.write_mode,
                    retire_missing=p.retire_missing, expected_fingerprint=cleaned.get("clean_fingerprint"),
                    data_as_of=cleaned.get("data_as_of"), allow_rewind=p.allow_rewind, lists="array",
                    held=tuple(held)), staged)
            except db.DatabaseError as err:
                raise StageError(str(err)) from None
        batch_rows = converted["result"]
        data = None  # the silver bytes (the converting thread's closure holds the same cell)
        current_rows = result["current_rows"]
        sample = db_read.preview(conn, staged, table)
        # The table's own population total (PostgreSQL's sum of a bigint is an exact numeric): what
        # the gold aggregates must add up to.
        population_total = db_read.total(conn, staged, table, "population")
        published = db.table_exists(conn, db_schema, history_table(table))
        history_rows = (db_read.count(conn, db_schema, history_table(table)) if published else 0) \
            + result["inserted"] + result["updated"]  # once published: a new version for each
    finally:
        conn.close()
    # The table this run's rows are for (staged in `staged_schema` until the publish).
    stage.record.output({"uri": database_uri(settings, db_schema, table), "rows": current_rows,
                         "inputs": [f"s3://{settings.clean_bucket}/{obj['key']}"], "role": "database"})
    result["held_keys"] = [{"country": k, "reasons": held.get(k, "")} for k in result["held_keys"]]
    stage.record.update(rows_in=batch_rows, rows_out=current_rows, **result, schema=db_schema, table=table,
                        staged_schema=staged, staged_from_load=base, data_as_of=cleaned.get("data_as_of"),
                        history_rows=history_rows, population_total=population_total,
                        allow_rewind=p.allow_rewind)
    return Loaded(result, sample, current_rows, history_rows)


