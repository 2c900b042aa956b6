"""Stage 4: the PostgreSQL table → the cloud bucket, as CSV under a run-scoped key."""

from __future__ import annotations

from lib import db, db_pipes, db_read, formats, layout, quality, registry, runs, storage
from lib.db_schema import changes_table, history_table
from lib.registry import Layer
from lib.stages.context import StageError, StageRun, database_uri


def _check_table(stage: StageRun, schema: str, table: str, rows: int, fingerprint: str) -> None:
    """The table about to be exported must be the one stage 3 left (no load or edit since)."""
    loaded = stage.previous_record(Layer.TABLE)
    if loaded is None:
        raise StageError(f"no {registry.writer_of(Layer.TABLE).name} record in run {stage.input_run(Layer.TABLE)} to "
                         f"check {schema}.{table} against; run it first; nothing was exported")
    details = loaded["details"]
    if (details.get("schema"), details.get("table")) != (schema, table):
        raise StageError(f"{registry.writer_of(Layer.TABLE).name} of run {loaded['run_id']} loaded "
                         f"{details.get('schema')}.{details.get('table')}, not {schema}.{table}; nothing was exported")
    if (details.get("current_rows"), details.get("current_fingerprint")) != (rows, fingerprint):
        from_load = registry.NAMES[registry.NAMES.index(registry.writer_of(Layer.TABLE).name):]
        raise StageError(
            f"{schema}.{table} is not the table run {loaded['run_id']} loaded: {rows} rows, fingerprint "
            f"{fingerprint[:16]}, the load recorded {details.get('current_rows')} rows, fingerprint "
            f"{str(details.get('current_fingerprint'))[:16]} (loaded or edited since); nothing was exported. "
            f"Load again first: {runs.run_again(stage.settings, stage.run_id, from_load)}")


def run(stage: StageRun) -> list[storage.Artifact]:
    """Stream each table with COPY ... TO STDOUT into the cloud bucket under a run-scoped key, once
    the table is proven to be what stage 3 recorded (its staging copy: the table as the publish
    will make it). The `latest` keys move at the publish (lib/publish.py),
    after the whole run has reconciled. column_case="upper" gives the CSV header the seed's
    upper-case names."""
    settings = stage.settings
    db_schema, table, column_case = stage.params.db_schema, stage.params.table, stage.params.column_case
    export_all_tables = stage.params.export_all_tables
    cloud = storage.cloud_client(settings.cloud)
    storage.ensure_bucket(cloud, settings.cloud.bucket, create=settings.cloud.emulated)
    conn = stage.db_connection()
    artifacts = []

    # The table as it will be once the run is published: stage 3's staging copy while it is there
    # (after the publish, the table itself; either way it is proven to be what stage 3 recorded).
    staged = ((stage.previous_record(Layer.TABLE) or {}).get("details") or {}).get("staged_schema")
    source = staged if staged and db.table_exists(conn, staged, table) else db_schema

    # The history as the publish will leave it: the published one with the run's staged changes.
    history_after = db_read.history_after(conn, db_schema, table, source) \
        if source != db_schema and db.table_exists(conn, source, changes_table(table)) else None

    def copy_table(name: str, *sinks) -> int:
        tee = storage.Tee(*sinks)
        rows = db_read.copy_out(conn, source if source != db_schema and db.table_exists(conn, source, name) else db_schema, name,
                                formats.UpperHeader(tee) if column_case == "upper" else tee,
                                pipeline_table=name == table,
                                query=history_after if name == history_table(table) else None)
        tee.flush()
        return rows

    try:
        if not db.table_exists(conn, source, table):
            raise StageError(f"table {db_schema}.{table} does not exist: run {registry.writer_of(Layer.TABLE).name} first")
        tables = db_read.tables(conn, db_schema) if export_all_tables else [table]
        for name in [table] + [t for t in tables if t != table]:
            key = layout.export_key(settings.cloud.prefix, name, stage.run_id)
            spool = storage.HashingSpool()
            try:
                if name != table:
                    rows = copy_table(name, spool)
                else:  # the fingerprint of the exported bytes, parsed in Arrow batches as COPY writes them
                    fp = quality.Fingerprint()
                    with db_pipes.streamed(lambda pipe: copy_table(table, spool, pipe)) as (stream, done):
                        for batch in formats.csv_arrow_batches(stream):
                            fp.add(batch)
                    rows, fp = done["result"], fp.result()
                    _check_table(stage, db_schema, table, rows, fp["fingerprint"])
                    stage.record.update(rows=rows, fingerprint=fp["fingerprint"], sha256=spool.sha256, key=key)
                artifact = storage.put_stream(
                    cloud, settings.cloud.bucket, key, spool.rewound(), size=spool.size, digest=spool.sha256,
                    rows=rows, inputs=[database_uri(settings, db_schema, name)], role="cloud",
                    content_type="text/csv", metadata=stage.meta(table=f"{db_schema}.{name}"))
            finally:
                spool.close()
            stage.record.output(artifact)  # its `latest` key moves only once the run has reconciled
            artifacts.append(artifact)
    finally:
        conn.close()
    stage.record.update(rows_in=artifacts[0].rows, rows_out=artifacts[0].rows,
                        tables=[a.key for a in artifacts], cloud=settings.cloud.kind, column_case=column_case)
    return artifacts


