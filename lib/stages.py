"""What each stage does, as plain functions the notebooks call (and tests call directly).

A notebook is: parameters → `begin()` → one or two calls here → previews. Every function takes the
`Stage` context, writes objects with metadata, and fills the stage record that `finish()` saves.
Where objects go is lib/layout.py; how they are encoded is lib/formats.py; which stage feeds which is
lib/registry.py.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from dataclasses import dataclass, field

import pandas as pd

from lib import config, contract, db, formats, gold, layout, params, quality, registry, runs, source, storage, transform
from lib import log as logsetup
from lib.errors import PipelineError

log = logging.getLogger(__name__)


class StageError(PipelineError):
    """A stage cannot go on; the message says what was wrong and what was (not) written."""


@dataclass
class Stage:
    name: str
    run_id: str
    settings: config.Settings
    record: runs.StageRecord

    def finish(self) -> str:
        """Save the record; returns its path, which a notebook displays as what was recorded."""
        from lib.report import RecordView

        path = self.record.save()
        log.info("%s of run %s done; record %s", self.name, self.run_id, path)
        self.refresh_manifest()
        return RecordView(path, self.record.data)

    def refresh_manifest(self) -> None:
        """An interactive run's manifest, derived again from its stage records (the runner does
        this itself for its runs)."""
        if self.record.data["origin"] != "runner":
            runs.RunRecord(self.settings, self.run_id).refresh()

    def meta(self, **extra) -> dict:
        """The metadata every object of this stage carries."""
        return {"run-id": self.run_id, "stage": self.name, **extra}

    def db_connection(self):
        return db.connect(self.settings.db, application_name=f"countries-medallion {self.name} {self.run_id}")

    @property
    def based_on(self) -> str | None:
        """The run an interactive run reads from when it did not run the earlier stages itself."""
        return runs.based_on(self.settings, self.run_id)

    def source_run(self, stage_name: str) -> str:
        """The run whose execution of `stage_name` this stage builds on: this run when it executed
        that stage, else the run it is based on (lib/runs.py `resolve_run_id`)."""
        if runs.read_stage(self.settings, self.run_id, stage_name) is None:
            base = self.based_on
            if base and runs.read_stage(self.settings, base, stage_name) is not None:
                return base
        return self.run_id

    def input_run(self, layer: str) -> str:
        """The run whose `layer` objects this stage reads."""
        return self.source_run(registry.writer_of(layer).name)

    def previous_record(self, layer: str) -> dict | None:
        """The record of the stage that wrote `layer` (in this run, or the run it is based on)."""
        writer = registry.writer_of(layer).name
        return runs.read_stage(self.settings, self.source_run(writer), writer)


def begin(stage: str, run_id: str = "", **parameters) -> Stage:
    """Load settings (from the environment, never from parameters), set up logging, pick the run."""
    registry.get(stage)
    for name, value in parameters.items():
        params.check(name, value)
    settings = config.settings()
    # In a notebook only what went wrong is shown, briefly (stderr would show every line as an alarm);
    # the daily log file keeps every line with its time.
    logsetup.setup(settings.logs_dir, settings.secrets(), stream=sys.stdout, stream_level=logging.WARNING,
                   stream_format="%(levelname)s: %(message)s")
    rid = runs.resolve_run_id(settings, run_id, stage)
    runs.open_interactive(settings, rid, stage)
    record = runs.StageRecord(settings, rid, stage, parameters).start()
    log.info("%s of run %s starting (%s)", stage, rid, record.data["origin"])
    current = Stage(stage, rid, settings, record)
    if record.data["origin"] != "runner":
        if current.based_on:
            log.info("run %s reads the data of run %s and writes only into its own record", rid, current.based_on)
        _watch_cells(current)
        current.refresh_manifest()
    return current


_WATCHER = None  # the post_run_cell hook of the stage begun last in this kernel


def _watch_cells(stage: Stage) -> None:
    """Outside the runner nobody else sees a cell fail: in an IPython kernel, a failing cell marks
    the stage record failed (and the manifest follows)."""
    global _WATCHER
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    if _WATCHER is not None:
        try:
            shell.events.unregister("post_run_cell", _WATCHER)
        except ValueError:
            pass

    def watcher(result):
        error = result.error_in_exec or result.error_before_exec
        if error is not None and stage.record.data.get("status") == "running":
            stage.record.fail(f"{type(error).__name__}: {error}")
            stage.refresh_manifest()

    shell.events.register("post_run_cell", watcher)
    _WATCHER = watcher


def run_objects(s3, bucket: str, run_id: str | None = None, date: str | None = None) -> list[dict]:
    """Objects of the dataset for one run (any date) or one date (any run), oldest first."""
    found = storage.list_objects(s3, bucket, layout.dataset_prefix(date))
    if run_id:
        found = [o for o in found if layout.run_of(o["key"]) == run_id]
    return sorted(found, key=lambda o: (o["last_modified"], o["key"]))


def _database_uri(settings: config.Settings, schema: str, table: str) -> str:
    return f"postgresql://{settings.db.host}:{settings.db.port}/{settings.db.name}/{schema}.{table}"


def verify_input(stage: Stage, s3, bucket: str, key: str, layer: str, *, required: bool = True,
                 against_record: bool = True) -> tuple[bytes, dict]:
    """Read an input object and prove it is what the stage that wrote it recorded: its sha256 must
    match the object's own metadata and the writer's stage record (when `required`, that record
    must exist; `against_record=False` checks the metadata only, for another run's objects). Raises
    StageError naming the object and the disagreeing side before anything is written."""
    data, meta = storage.get_bytes(s3, bucket, key)
    digest = storage.sha256(data)
    uri = f"s3://{bucket}/{key}"
    expected = {"the object's metadata": meta.get("sha256")}
    record = stage.previous_record(layer) if against_record else None
    if record is not None:
        listed = [a.get("sha256") for a in record.get("artifacts", []) if a.get("uri") == uri]
        expected[f"the {record['stage']} record of run {record['run_id']}"] = listed[-1] if listed else "nothing (not listed)"
    elif required and against_record:
        writer = registry.writer_of(layer).name
        raise StageError(f"{uri}: no {writer} record to check it against in run {stage.input_run(layer)}; "
                         f"run {writer} first; nothing was written")
    for where, value in expected.items():
        if value != digest:
            raise StageError(f"checksum mismatch for {uri}: sha256 {digest} but {where} says {value}; "
                             f"nothing was written by {stage.name}")
    return data, meta


# --- 1. ingest -----------------------------------------------------------------------------------

@dataclass
class Ingested:
    origin: str
    records: list[dict]
    artifact: storage.Artifact
    attempts: list[dict] = field(default_factory=list)
    reused: bool = False


def ingest(stage: Stage, *, api_url: str = "", snapshot_fallback: str = "auto", min_records: int = 1,
           **fetch_options) -> Ingested:
    """API → raw bucket, bytes unchanged (lib/layout.py `raw_key`). The payload is checked before
    anything is written. A run's bronze is written once: running the stage again for the same run
    reuses it."""
    settings = stage.settings
    url = source.check_url(api_url or settings.api_url)
    fallback = (settings.snapshot_fallback if snapshot_fallback == "auto"
                else params.boolean(snapshot_fallback, "snapshot_fallback"))
    s3 = storage.client(settings.store)
    storage.ensure_bucket(s3, settings.raw_bucket)
    existing = run_objects(s3, settings.raw_bucket, stage.run_id)
    if existing:
        key = existing[-1]["key"]
        data, meta = storage.get_bytes(s3, settings.raw_bucket, key)
        records = source.parse_payload(data, min_records)
        artifact = storage.Artifact(settings.raw_bucket, key, len(data), storage.sha256(data), len(records),
                                    [meta.get("source-url", url)])
        log.info("run %s already has bronze at %s: reusing it", stage.run_id, artifact.uri)
        result = Ingested(meta.get("source", "api"), records, artifact, reused=True)
    else:
        fetched = source.fetch_or_snapshot(url, fallback=fallback, **fetch_options)
        records = source.parse_payload(fetched.data, min_records)  # raises before anything is written
        origin_ref = url if fetched.origin == "api" else f"bundled snapshot lib/data/{source.SNAPSHOT}"
        artifact = storage.put_bytes(
            s3, settings.raw_bucket, layout.raw_key(stage.run_id), fetched.data, rows=len(records),
            inputs=[origin_ref], metadata=stage.meta(source=fetched.origin, **{"source-url": url}),
            content_type="application/json")
        result = Ingested(fetched.origin, records, artifact, fetched.attempts)
        stage.record.update(fallback_reason=fetched.fallback_reason)
    stage.record.output(result.artifact)
    stage.record.update(rows_in=len(records), rows_out=len(records), origin=result.origin,
                        records=len(records), response_sha256=result.artifact.sha256,
                        attempts=result.attempts, reused=result.reused, url=url)
    return result


# --- 2. raw → clean ------------------------------------------------------------------------------

@dataclass
class Prepared:
    validated: quality.Validated
    raw_objects: list[dict]
    drift: dict
    superseded: int
    date: str
    backfill_date: str = ""
    data_as_of: str | None = None  # when the newest bronze object read was written

    @property
    def raw_records(self) -> int:
        return sum(o["records"] for o in self.raw_objects)


def prepare_clean(stage: Stage, *, backfill_date: str = "", min_records: int = 1) -> Prepared:
    """Read every raw object of the run (or, with backfill_date, of that date), flatten and validate.
    Nothing is written here. When several objects hold the same country, the newest object wins
    and the older copies count as superseded."""
    settings = stage.settings
    params.check("backfill_date", backfill_date)
    s3 = storage.client(settings.store)
    source_run = stage.input_run("raw")
    objects = (run_objects(s3, settings.raw_bucket, date=backfill_date) if backfill_date
               else run_objects(s3, settings.raw_bucket, source_run))
    where = f"date {backfill_date}" if backfill_date else f"run {source_run}"
    if not objects:
        raise StageError(f"no raw objects for {where} in bucket {settings.raw_bucket!r}: "
                         f"run {registry.writer_of('raw').name} first")
    frames, records, raw = [], [], []
    for obj in objects:
        # Bronze put in place by hand has no stage 1 record: its metadata is checked. A backfill
        # reads other runs' bronze too: checked against their metadata.
        data, _ = verify_input(stage, s3, settings.raw_bucket, obj["key"], "raw", required=False,
                               against_record=layout.run_of(obj["key"]) == source_run)
        try:
            batch = source.parse_payload(data, min_records)
        except source.PayloadError as err:
            raise StageError(f"s3://{settings.raw_bucket}/{obj['key']}: {err}; nothing was written") from None
        frame = transform.flatten(batch).assign(_object=len(raw), _position=range(len(batch)))
        frames.append(frame)
        records += batch
        raw.append({"uri": f"s3://{settings.raw_bucket}/{obj['key']}", "records": len(batch),
                    "sha256": storage.sha256(data)})
    frame = pd.concat(frames, ignore_index=True)
    # Across objects the newest copy of a key wins; within one object duplicates are quarantined.
    # Grouped by the key's bytes: a key holding a lone surrogate (quarantined later) must not break this.
    key_bytes = frame[contract.KEY].map(lambda v: v.encode("utf-8", "surrogatepass") if isinstance(v, str) else v)
    last_object = frame.groupby(key_bytes, dropna=True)["_object"].transform("max")
    older = frame["_object"] < last_object.reindex(frame.index).fillna(frame["_object"])
    kept = frame[~older]
    kept_records = [records[i] for i in kept.index]
    where = kept.reset_index(drop=True)
    validated = quality.validate(where.drop(columns=["_object", "_position"]), kept_records)
    # Point each quarantined record at its raw object and its position there.
    validated.quarantine.insert(1, "raw_object", [raw[where.at[i, "_object"]]["uri"] for i in validated.quarantine["record"]])
    validated.quarantine["record"] = [int(where.at[i, "_position"]) for i in validated.quarantine["record"]]
    date = backfill_date or layout.date_of(objects[0]["key"])
    fetched = max(o["last_modified"] for o in objects).isoformat()
    return Prepared(validated, raw, quality.drift(records), int(older.sum()), date, backfill_date, fetched)


def write_clean(stage: Stage, prepared: Prepared, *, max_invalid_fraction: float = 0.05,
                silver_format: str = "") -> list[storage.Artifact]:
    """Check the share of bad records, then write the clean table and the quarantine with reasons,
    in `silver_format` ('' for lib/formats.py's default)."""
    settings = stage.settings
    fmt = formats.get(silver_format or formats.SILVER)
    counts = prepared.validated.counts
    total = counts["records"]
    fraction = counts["quarantined"] / total if total else 1.0
    if fraction > max_invalid_fraction:
        raise StageError(
            f"{counts['quarantined']} of {total} records ({fraction:.1%}) break the contract, more than "
            f"max_invalid_fraction={max_invalid_fraction:.1%}; nothing was written to {settings.clean_bucket!r}")
    s3 = storage.client(settings.store)
    storage.ensure_bucket(s3, settings.clean_bucket)
    inputs = [o["uri"] for o in prepared.raw_objects]
    clean = prepared.validated.clean
    meta = stage.meta(**{"contract-version": contract.VERSION, "format": fmt.name})
    artifacts = [
        storage.put_bytes(s3, settings.clean_bucket, key, fmt.encode(frame), rows=len(frame), inputs=inputs,
                          content_type=fmt.content_type, metadata=meta)
        for key, frame in (
            (layout.clean_key(prepared.date, stage.run_id, fmt.extension), clean[contract.COLUMNS + ["_row_hash"]]),
            (layout.quarantine_key(prepared.date, stage.run_id, fmt.extension), prepared.validated.quarantine),
        )
    ]
    for artifact in artifacts:
        stage.record.output(artifact)
    raw_sha = (prepared.raw_objects[0]["sha256"] if len(prepared.raw_objects) == 1
               else storage.sha256("".join(o["sha256"] for o in prepared.raw_objects).encode()))
    silver = len(clean) + counts["quarantined"] + prepared.superseded
    breakdown = f"{len(clean)} + {counts['quarantined']}" + (
        f" + {prepared.superseded} superseded" if prepared.superseded else "")
    stage.record.update(
        rows_in=prepared.raw_records, rows_out=len(clean), raw_objects=prepared.raw_objects,
        raw_records=prepared.raw_records, raw_sha256=raw_sha, clean_rows=len(clean),
        quarantined=counts["quarantined"], superseded=prepared.superseded, invalid_fraction=round(fraction, 6),
        silver_records=silver, silver_breakdown=breakdown,
        clean_fingerprint=quality.fingerprint(clean)["fingerprint"], drift=prepared.drift,
        contract_version=contract.VERSION, format=fmt.name, backfill_date=prepared.backfill_date or None,
        data_as_of=prepared.data_as_of, duplicates=prepared.validated.duplicates,
        unreconciled=({"raw (bronze)": "a backfill reads other runs' bronze too"} if prepared.backfill_date else {}))
    return artifacts


# --- 3. clean → PostgreSQL --------------------------------------------------------------------------

@dataclass
class Loaded:
    result: dict
    preview: pd.DataFrame  # the first current rows by key (the table itself is never read whole)
    current_rows: int
    history_rows: int


def clean_object(stage: Stage, s3) -> dict:
    """The silver table this load reads: the one stage 2's record lists (in this run, or the run an
    interactive run is based on); without a record, the run's newest clean object."""
    record = stage.previous_record("clean")
    if record is not None:
        listed = [a for a in record.get("artifacts", []) if layout.is_clean(a.get("key", ""))]
        if listed:
            return {"key": listed[-1]["key"]}
    run = stage.input_run("clean")
    found = [o for o in run_objects(s3, stage.settings.clean_bucket, run) if layout.is_clean(o["key"])]
    if not found:
        raise StageError(f"no clean object for run {run} in bucket {stage.settings.clean_bucket!r}: "
                         f"run {registry.writer_of('clean').name} first")
    return found[-1]


def load(stage: Stage, *, db_schema: str = "public", table: str = "capitals_clean", write_mode: str = "upsert",
         retire_missing: bool = True, allow_rewind: bool = False) -> Loaded:
    """Merge the run's silver table into PostgreSQL (lib/db.py `merge`: one transaction, history).
    The silver object is checked against stage 2's record first; inside the transaction the rows
    as stored are compared with stage 2's fingerprint, and a mismatch rolls the load back. Loading
    data older than the table's latest load needs allow_rewind=true."""
    settings = stage.settings
    for name, value in (("db_schema", db_schema), ("table", table), ("write_mode", write_mode)):
        params.check(name, value)
    allow_rewind = params.boolean(allow_rewind, "allow_rewind")
    s3 = storage.client(settings.store)
    obj = clean_object(stage, s3)
    data, _ = verify_input(stage, s3, settings.clean_bucket, obj["key"], "clean")
    cleaned = stage.previous_record("clean")["details"]
    import tempfile

    fmt = formats.of_key(obj["key"])
    conn = stage.db_connection()
    try:
        with tempfile.TemporaryFile() as spool:  # the CSV that COPY reads, converted in Arrow batches
            batch_rows = formats.copy_csv(data, fmt.name, spool)
            del data
            spool.seek(0)
            try:
                # The batch is proven inside the merge, and the whole table's fingerprint recomputed
                # from its stored values in the same transaction.
                result = db.merge(conn, spool, schema=db_schema, table=table, run_id=stage.run_id, mode=write_mode,
                                  retire_missing=retire_missing, expected_fingerprint=cleaned.get("clean_fingerprint"),
                                  data_as_of=cleaned.get("data_as_of"), allow_rewind=allow_rewind)
            except db.DatabaseError as err:
                raise StageError(str(err)) from None
        current_rows = result["current_rows"]
        sample = db.preview(conn, db_schema, table)
        history_rows = db.count(conn, db_schema, db.history_table(table))
    finally:
        conn.close()
    stage.record.output({"uri": _database_uri(settings, db_schema, table), "rows": current_rows,
                         "inputs": [f"s3://{settings.clean_bucket}/{obj['key']}"], "role": "database"})
    stage.record.update(rows_in=batch_rows, rows_out=current_rows, **result, schema=db_schema, table=table,
                        history_rows=history_rows,
                        allow_rewind=allow_rewind)
    return Loaded(result, sample, current_rows, history_rows)


# --- 4. PostgreSQL → cloud ----------------------------------------------------------------------------

def _check_table(stage: Stage, schema: str, table: str, rows: int, fingerprint: str) -> None:
    """The table about to be exported must be the one stage 3 left (no load or edit since)."""
    loaded = stage.previous_record("table")
    if loaded is None:
        raise StageError(f"no {registry.writer_of('table').name} record in run {stage.input_run('table')} to "
                         f"check {schema}.{table} against; run it first; nothing was exported")
    details = loaded["details"]
    if (details.get("schema"), details.get("table")) != (schema, table):
        raise StageError(f"{registry.writer_of('table').name} of run {loaded['run_id']} loaded "
                         f"{details.get('schema')}.{details.get('table')}, not {schema}.{table}; nothing was exported")
    if (details.get("current_rows"), details.get("current_fingerprint")) != (rows, fingerprint):
        raise StageError(
            f"{schema}.{table} is not the table run {loaded['run_id']} loaded: {rows} rows, fingerprint "
            f"{fingerprint[:16]}, the load recorded {details.get('current_rows')} rows, fingerprint "
            f"{str(details.get('current_fingerprint'))[:16]} (loaded or edited since); nothing was exported. "
            f"Load again first: python run_pipeline.py --stages 3-5 --run-id {stage.run_id}")


def export(stage: Stage, *, db_schema: str = "public", table: str = "capitals_clean",
           export_all_tables: bool = False, column_case: str = "lower") -> list[storage.Artifact]:
    """Stream each table with COPY ... TO STDOUT into the cloud bucket under a run-scoped key, once
    the table is proven to be what stage 3 recorded. The `latest` keys move in stage 5's `publish`,
    after the whole run has reconciled. column_case="upper" gives the CSV header the seed's
    upper-case names."""
    settings = stage.settings
    params.check("db_schema", db_schema)
    params.check("table", table)
    params.check("column_case", column_case)
    cloud = storage.cloud_client(settings.cloud)
    storage.ensure_bucket(cloud, settings.cloud.bucket, create=settings.cloud.emulated)
    conn = stage.db_connection()
    artifacts = []
    try:
        if not db.table_exists(conn, db_schema, table):
            raise StageError(f"table {db_schema}.{table} does not exist: run {registry.writer_of('table').name} first")
        tables = db.tables(conn, db_schema) if export_all_tables else [table]
        for name in [table] + [t for t in tables if t != table]:
            key = layout.export_key(settings.cloud.prefix, name, stage.run_id)
            spool = storage.HashingSpool()
            try:
                sink = formats.UpperHeader(spool) if column_case == "upper" else spool
                rows = db.copy_out(conn, db_schema, name, sink, pipeline_table=name == table)
                if name == table:  # the fingerprint of the exported bytes, parsed back in Arrow batches
                    fp = quality.Fingerprint()
                    for batch in formats.csv_arrow_batches(spool.rewound()):
                        fp.add(batch)
                    fp = fp.result()
                    _check_table(stage, db_schema, table, rows, fp["fingerprint"])
                    stage.record.update(rows=rows, fingerprint=fp["fingerprint"], sha256=spool.sha256, key=key)
                artifact = storage.put_stream(
                    cloud, settings.cloud.bucket, key, spool.rewound(), size=spool.size, digest=spool.sha256,
                    rows=rows, inputs=[_database_uri(settings, db_schema, name)], role="cloud",
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


# --- 5. cloud → gold ----------------------------------------------------------------------------------

@dataclass
class Golden:
    table: pd.DataFrame  # a sample: the gold table's first rows (the table itself is never held whole)
    aggregates: dict[str, pd.DataFrame]
    changes: dict
    reconciliation: pd.DataFrame | None
    artifacts: list[storage.Artifact]


# The columns the aggregates read (lib/gold.py): only these are taken out of Arrow into pandas.
AGGREGATE_COLUMNS = [contract.KEY, "region", "subregion", "population", "area"]


def _previous_gold(s3, bucket: str, table: str, run_id: str) -> tuple[bytes | None, str | None]:
    """The gold table of the previous successful run, as Parquet bytes whatever format it was written
    in: the `latest` one, unless that is this run (a rerun), in which case the one it replaced."""
    for fmt in formats.FORMATS.values():
        latest = storage.head(s3, bucket, layout.latest(layout.gold_table_key(table, run_id, fmt.extension)))
        if latest is None:
            continue
        previous = latest["metadata"].get("run-id")
        if previous == run_id:
            previous = latest["metadata"].get("previous-run-id") or None
        if not previous:
            return None, None
        for kind in formats.FORMATS.values():
            key = layout.gold_table_key(table, previous, kind.extension)
            if storage.head(s3, bucket, key) is not None:
                data, _ = storage.get_bytes(s3, bucket, key)
                return (data if kind.name == "parquet" else formats.csv_to_parquet(data)[0]), previous
        return None, None
    return None, None


def _spooled_input(stage: Stage, s3, bucket: str, key: str, layer: str) -> storage.HashingSpool:
    """`verify_input` for an object too large to hold: streamed to a spool on disk while hashed, then
    its sha256 proven against its metadata and the writer's record (when there is one), before
    anything is written. Close the spool after use."""
    body, meta = storage.open_object(s3, bucket, key)
    spool = storage.HashingSpool()
    try:
        for chunk in iter(lambda: body.read(8 << 20), b""):
            spool.write(chunk)
    except BaseException:
        spool.close()
        raise
    finally:
        body.close()
    uri, digest = f"s3://{bucket}/{key}", spool.sha256
    expected = {"the object's metadata": meta.get("sha256")}
    record = stage.previous_record(layer)
    if record is not None:
        listed = [a.get("sha256") for a in record.get("artifacts", []) if a.get("uri") == uri]
        expected[f"the {record['stage']} record of run {record['run_id']}"] = listed[-1] if listed else "nothing (not listed)"
    for where, value in expected.items():
        if value != digest:
            spool.close()
            raise StageError(f"checksum mismatch for {uri}: sha256 {digest} but {where} says {value}; "
                             f"nothing was written by {stage.name}")
    return spool


def build_gold(stage: Stage, *, table: str = "capitals_clean", gold_format: str = "") -> Golden:
    """Fetch this run's export, verify its checksum against what stage 4 wrote, then write gold:
    the table, aggregates by region and subregion, the change report. `reconcile` and `publish`
    follow. The export is converted to typed Parquet in Arrow batches; the aggregates read only
    their columns and the change report compares column by column (lib/gold.py `changes_between`)."""
    settings = stage.settings
    params.check("table", table)
    fmt = formats.get(gold_format or formats.GOLD)
    cloud = storage.cloud_client(settings.cloud)
    key = layout.export_key(settings.cloud.prefix, table, stage.input_run("cloud"))
    spool = _spooled_input(stage, cloud, settings.cloud.bucket, key, "cloud")
    digest = spool.sha256
    try:
        typed, rows = formats.csv_to_parquet(spool.rewound())
        exported = (stage.previous_record("cloud") or {}).get("details") or {}
        if exported.get("key") == key and exported.get("sha256") == digest and exported.get("fingerprint"):
            # A proof, not a shortcut: these bytes are byte for byte (sha256) the ones stage 4 parsed and
            # fingerprinted, so their fingerprint is the one it recorded.
            fp = {"rows": rows, "fingerprint": exported["fingerprint"]}
        else:  # no record of stage 4 for this object: the fingerprint is recomputed from the values
            fp = quality.Fingerprint()
            for batch in formats.csv_arrow_batches(spool.rewound()):
                fp.add(batch)
            fp = fp.result()
        # A CSV gold table is the export's bytes as they are; Parquet is the typed conversion.
        gold_body = spool if fmt.name == "csv" else typed
        golden = _write_gold(stage, fmt, table, key, typed, rows, fp, digest, gold_body)
    finally:
        spool.close()
    return golden


def _write_gold(stage: Stage, fmt: formats.Format, table: str, key: str, typed: bytes, rows: int, fp: dict,
                digest: str, gold_body) -> Golden:
    """The rest of `build_gold`: the change report, the aggregates and every gold object."""
    import pyarrow.parquet as pq

    settings = stage.settings
    s3 = storage.client(settings.store)
    storage.ensure_bucket(s3, settings.gold_bucket)
    previous, previous_id = _previous_gold(s3, settings.gold_bucket, table, stage.run_id)
    report = gold.changes_between(previous, typed, previous_id)
    del previous
    columns = pq.read_table(io.BytesIO(typed), columns=AGGREGATE_COLUMNS)
    frame = pd.DataFrame({name: pd.Series(columns.column(name).to_pylist(), dtype=object)
                          if name in contract.TEXT_COLUMNS else columns.column(name).to_numpy()
                          for name in AGGREGATE_COLUMNS})
    del columns
    aggregates = {name: fn(frame) for name, fn in gold.AGGREGATES.items()}
    del frame
    sample = formats.parquet_decode(typed, rows=10)
    source_uri = f"s3://{settings.cloud.bucket}/{key}"
    meta_out = stage.meta(**{"previous-run-id": previous_id, "format": fmt.name})
    changes = json.dumps(report, indent=2, ensure_ascii=False, default=str).encode()
    outputs = [
        (layout.gold_table_key(table, stage.run_id, fmt.extension), gold_body, rows, fmt.content_type),
        *((layout.aggregate_key(name, stage.run_id, fmt.extension), fmt.encode(agg), len(agg), fmt.content_type)
          for name, agg in aggregates.items()),
        (layout.changes_key(stage.run_id), changes,
         len(report["added"]) + len(report["removed"]) + len(report["changed"]), "application/json"),
    ]
    artifacts = [storage.put_stream(s3, settings.gold_bucket, k, body.rewound(), size=body.size, digest=body.sha256,
                                    rows=n, inputs=[source_uri], metadata=meta_out, content_type=content_type)
                 if isinstance(body, storage.HashingSpool) else
                 storage.put_bytes(s3, settings.gold_bucket, k, body, rows=n, inputs=[source_uri],
                                   metadata=meta_out, content_type=content_type)
                 for k, body, n, content_type in outputs]
    for artifact in artifacts:
        stage.record.output(artifact)
    stage.record.update(rows_in=rows, rows_out=rows, gold_rows=rows,
                        gold_fingerprint=fp["fingerprint"], gold_sha256=digest, previous_run_id=previous_id,
                        format=fmt.name, changes={k: len(v) for k, v in report.items() if k != "previous_run_id"},
                        by_region=dict(zip(aggregates["by_region"]["region"].astype(str),
                                           aggregates["by_region"]["population"].astype(int).tolist())))
    return Golden(sample, aggregates, report, None, artifacts)


def reconcile(stage: Stage, golden: Golden) -> pd.DataFrame:
    """Counts and fingerprints at every hop of this run (lib/registry.py); raises naming the first hop
    that disagrees. The table is recorded either way. Nothing is published here."""
    details = {s.name: (runs.read_stage(stage.settings, stage.source_run(s.name), s.name) or {}).get("details")
               for s in registry.before(stage.name)}
    details[stage.name] = stage.record.data["details"]
    try:
        table = gold.reconcile(details)
    except gold.ReconciliationError as err:
        rows = err.table.to_dict(orient="records") if err.table is not None else []
        stage.record.update(reconciliation=rows, reconciliation_error=str(err).split("\n")[0])
        raise
    stage.record.update(reconciliation=table.to_dict(orient="records"), reconciliation_error=None)
    golden.reconciliation = table
    return table


def publish(stage: Stage, golden: Golden) -> list[str]:
    """Once every hop has reconciled, move the run's `latest` keys: the cloud export(s) of stage 4,
    then the gold objects. Until then consumers see the previous proven run."""
    if golden.reconciliation is None:
        raise StageError(f"run {stage.run_id} has not reconciled: nothing was published")
    settings = stage.settings
    exported = stage.previous_record("cloud") or {}
    moves = [(storage.cloud_client(settings.cloud), a) for a in exported.get("artifacts", [])
             if a.get("role") == "cloud" and layout.run_of(a["key"])]
    s3 = storage.client(settings.store)
    moves += [(s3, a.to_dict()) for a in golden.artifacts]
    published = []
    for client, artifact in moves:
        latest = layout.latest(artifact["key"])
        storage.copy(client, artifact["bucket"], artifact["key"], latest)
        # One `latest` per object whatever format it is written in: a copy in another format, left by
        # a run before a format change, would otherwise look current to readers.
        for stale in formats.other_format_keys(latest):
            storage.delete(client, artifact["bucket"], stale)
        published.append(f"s3://{artifact['bucket']}/{latest}")
        stage.record.update(published=published)
    return published


# --- previews ---------------------------------------------------------------------------------------

def preview(frame: pd.DataFrame, rows: int = 10, by: str | None = contract.KEY) -> pd.DataFrame:
    """A small, sorted preview with long free text cut short, so run records stay light; URIs and
    keys are shown whole."""
    out = frame.sort_values(by).head(rows) if by and by in frame else frame.head(rows)
    return out.map(lambda v: quality.safe_text((v[:60] + "…") if isinstance(v, str) and len(v) > 61
                                                and "://" not in v else v))


def schema(frame: pd.DataFrame) -> pd.DataFrame:
    """Column, dtype, non-null count and an example value."""
    return pd.DataFrame({
        "column": frame.columns,
        "dtype": [str(t) for t in frame.dtypes],
        "non_null": [int(frame[c].notna().sum()) for c in frame.columns],
        "example": [quality.safe_text(str(frame[c].dropna().iloc[0])[:40]) if frame[c].notna().any() else ""
                    for c in frame.columns],
    })
