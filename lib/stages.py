"""What each stage does, as plain functions the notebooks call (and tests call directly).

A notebook is: parameters → `begin()` → one or two calls here → previews. Every function takes the
`Stage` context, writes objects with metadata, and fills the stage record that `finish()` saves.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pandas as pd

from lib import config, db, gold, names, quality, runs, source, storage, transform
from lib import log as logsetup

log = logging.getLogger(__name__)

RAW_PREFIX = "countries"
CLEAN_NAME = "capitals_clean.csv"


class StageError(RuntimeError):
    """A stage cannot go on; the message says what was wrong and what was (not) written."""


@dataclass
class Stage:
    name: str
    run_id: str
    settings: config.Settings
    record: runs.StageRecord

    def finish(self) -> str:
        path = self.record.save()
        log.info("%s of run %s done; record %s", self.name, self.run_id, path)
        return str(path)


def begin(stage: str, run_id: str = "", **parameters) -> Stage:
    """Load settings (from the environment, never from parameters), set up logging, pick the run."""
    settings = config.load()
    # In a notebook, progress is ordinary output (stderr would show every line as an alarm).
    logsetup.setup(settings.logs_dir, settings.secrets(), stream=sys.stdout)
    rid = runs.resolve_run_id(settings, run_id, stage)
    log.info("%s of run %s starting", stage, rid)
    return Stage(stage, rid, settings, runs.StageRecord(settings, rid, stage, parameters))


def _meta(stage: Stage, **extra) -> dict:
    return {"run-id": stage.run_id, "stage": stage.name, **extra}


def ingest_date(run_id: str) -> str:
    """The partition date of a run: from its id when it is a generated one, else today (UTC)."""
    match = re.match(r"^(\d{4})(\d{2})(\d{2})T", run_id)
    if match:
        return "-".join(match.groups())
    return f"{datetime.now(timezone.utc):%Y-%m-%d}"


def run_keys(s3, bucket: str, run_id: str | None = None, date: str | None = None,
             prefix: str = RAW_PREFIX) -> list[dict]:
    """Objects of one run (any date) or of one date (any run), oldest first."""
    base = f"{prefix}/ingest_date={date}/" if date else f"{prefix}/"
    found = storage.list_objects(s3, bucket, base)
    if run_id:
        found = [o for o in found if f"/run_id={run_id}/" in o["key"]]
    return sorted(found, key=lambda o: (o["last_modified"], o["key"]))


# --- 1. ingest -----------------------------------------------------------------------------------

def _bool_param(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise StageError(f"{name}={value!r} is not true, false or auto")


@dataclass
class Ingested:
    origin: str
    records: list[dict]
    artifact: storage.Artifact
    attempts: list[dict] = field(default_factory=list)
    reused: bool = False


def ingest(stage: Stage, *, api_url: str = "", snapshot_fallback: str = "auto", min_records: int = 1,
           **fetch_options) -> Ingested:
    """API → raw bucket, bytes unchanged, under countries/ingest_date=D/run_id=R/countries.json.
    The payload is checked before anything is written. A run's bronze is written once: running
    the stage again for the same run reuses it."""
    settings = stage.settings
    url = source.check_url(api_url or settings.api_url)
    fallback = settings.snapshot_fallback if snapshot_fallback == "auto" else _bool_param(snapshot_fallback, "snapshot_fallback")
    s3 = storage.client(settings.store)
    storage.ensure_bucket(s3, settings.raw_bucket)
    existing = run_keys(s3, settings.raw_bucket, stage.run_id)
    if existing:
        key = existing[-1]["key"]
        data, meta = storage.get_bytes(s3, settings.raw_bucket, key)
        records = source.parse_payload(data, min_records)
        origin = meta.get("source", "api")
        artifact = storage.Artifact(settings.raw_bucket, key, len(data), storage.sha256(data), len(records),
                                    [meta.get("source-url", url)])
        log.info("run %s already has bronze at %s: reusing it", stage.run_id, artifact.uri)
        result = Ingested(origin, records, artifact, reused=True)
    else:
        fetched = source.ingest(url, fallback=fallback, **fetch_options)
        records = source.parse_payload(fetched.data, min_records)  # raises before anything is written
        key = f"{RAW_PREFIX}/ingest_date={ingest_date(stage.run_id)}/run_id={stage.run_id}/countries.json"
        origin_ref = url if fetched.origin == "api" else f"bundled snapshot lib/data/{source.SNAPSHOT}"
        artifact = storage.put_bytes(
            s3, settings.raw_bucket, key, fetched.data, rows=len(records), inputs=[origin_ref],
            metadata=_meta(stage, source=fetched.origin, **{"source-url": url}),
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

    @property
    def raw_records(self) -> int:
        return sum(o["records"] for o in self.raw_objects)


def prepare_clean(stage: Stage, *, backfill_date: str = "", min_records: int = 1) -> Prepared:
    """Read every raw object of the run (or, with backfill_date, of that date), flatten and validate.
    Nothing is written here. When several objects hold the same country, the newest object wins
    and the older copies count as superseded."""
    settings = stage.settings
    if backfill_date and not re.match(r"^\d{4}-\d{2}-\d{2}$", backfill_date):
        raise StageError(f"backfill_date={backfill_date!r} is not a date shaped YYYY-MM-DD")
    s3 = storage.client(settings.store)
    objects = (run_keys(s3, settings.raw_bucket, date=backfill_date) if backfill_date
               else run_keys(s3, settings.raw_bucket, stage.run_id))
    where = f"date {backfill_date}" if backfill_date else f"run {stage.run_id}"
    if not objects:
        raise StageError(f"no raw objects for {where} in bucket {settings.raw_bucket!r}: run 01_ingest first")
    frames, records, raw = [], [], []
    for obj in objects:
        data, _ = storage.get_bytes(s3, settings.raw_bucket, obj["key"])
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
    last_object = frame.groupby(quality.KEY, dropna=True)["_object"].transform("max")
    older = frame["_object"] < last_object.reindex(frame.index).fillna(frame["_object"])
    kept = frame[~older]
    kept_records = [records[i] for i in kept.index]
    where = kept.reset_index(drop=True)
    validated = quality.validate(where.drop(columns=["_object", "_position"]), kept_records)
    # Point each quarantined record at its raw object and its position there.
    validated.quarantine.insert(1, "raw_object", [raw[where.at[i, "_object"]]["uri"] for i in validated.quarantine["record"]])
    validated.quarantine["record"] = [int(where.at[i, "_position"]) for i in validated.quarantine["record"]]
    date = backfill_date or objects[0]["key"].split("ingest_date=")[1].split("/")[0]
    return Prepared(validated, raw, quality.drift(records), int(older.sum()), date, backfill_date)


def write_clean(stage: Stage, prepared: Prepared, *, max_invalid_fraction: float = 0.05) -> list[storage.Artifact]:
    """Check the share of bad records, then write the clean CSV and the quarantine with reasons."""
    settings = stage.settings
    counts = prepared.validated.counts
    total = counts["records"]
    fraction = counts["quarantined"] / total if total else 1.0
    if fraction > max_invalid_fraction:
        raise StageError(
            f"{counts['quarantined']} of {total} records ({fraction:.1%}) break the contract, more than "
            f"max_invalid_fraction={max_invalid_fraction:.1%}; nothing was written to {settings.clean_bucket!r}")
    s3 = storage.client(settings.store)
    storage.ensure_bucket(s3, settings.clean_bucket)
    part = f"ingest_date={prepared.date}/run_id={stage.run_id}"
    inputs = [o["uri"] for o in prepared.raw_objects]
    clean = prepared.validated.clean
    artifacts = [
        storage.put_bytes(s3, settings.clean_bucket, f"{RAW_PREFIX}/{part}/{CLEAN_NAME}",
                          transform.to_csv(clean, quality.COLUMNS + ["_row_hash"]),
                          rows=len(clean), inputs=inputs, content_type="text/csv",
                          metadata=_meta(stage, **{"contract-version": quality.CONTRACT_VERSION})),
        storage.put_bytes(s3, settings.clean_bucket, f"quarantine/{part}/quarantine.csv",
                          prepared.validated.quarantine.to_csv(index=False).encode("utf-8"),
                          rows=counts["quarantined"], inputs=inputs, content_type="text/csv",
                          metadata=_meta(stage, **{"contract-version": quality.CONTRACT_VERSION})),
    ]
    for artifact in artifacts:
        stage.record.output(artifact)
    raw_sha = (prepared.raw_objects[0]["sha256"] if len(prepared.raw_objects) == 1
               else storage.sha256("".join(o["sha256"] for o in prepared.raw_objects).encode()))
    stage.record.update(
        rows_in=prepared.raw_records, rows_out=len(clean), raw_objects=prepared.raw_objects,
        raw_records=prepared.raw_records, raw_sha256=raw_sha, clean_rows=len(clean),
        quarantined=counts["quarantined"], superseded=prepared.superseded, invalid_fraction=round(fraction, 6),
        clean_fingerprint=quality.fingerprint(clean)["fingerprint"], drift=prepared.drift,
        contract_version=quality.CONTRACT_VERSION, backfill_date=prepared.backfill_date or None)
    return artifacts


# --- 3. clean → PostgreSQL --------------------------------------------------------------------------

@dataclass
class Loaded:
    result: dict
    current: pd.DataFrame
    history_rows: int


def clean_object(stage: Stage, s3) -> dict:
    found = run_keys(s3, stage.settings.clean_bucket, stage.run_id)
    found = [o for o in found if o["key"].endswith("/" + CLEAN_NAME)]
    if not found:
        raise StageError(f"no clean object for run {stage.run_id} in bucket {stage.settings.clean_bucket!r}: "
                         "run 02_clean first")
    return found[-1]


def load(stage: Stage, *, db_schema: str = "public", table: str = "capitals_clean", write_mode: str = "upsert",
         retire_missing: bool = True) -> Loaded:
    settings = stage.settings
    names.sql_identifier(db_schema, "schema")
    names.sql_identifier(table, "table")
    if write_mode not in db.WRITE_MODES:
        raise StageError(f"write_mode={write_mode!r} is not one of {', '.join(db.WRITE_MODES)}")
    s3 = storage.client(settings.store)
    obj = clean_object(stage, s3)
    data, _ = storage.get_bytes(s3, settings.clean_bucket, obj["key"])
    batch = transform.read_csv(data)
    conn = db.connect(settings.db, application_name=f"countries-medallion {stage.name} {stage.run_id}")
    try:
        result = db.load(conn, data, schema=db_schema, table=table, run_id=stage.run_id, mode=write_mode,
                         retire_missing=retire_missing)
        current = db.current(conn, db_schema, table)
        with conn.cursor() as cur:
            cur.execute(db.sql.SQL("SELECT count(*) FROM {}").format(
                db.ident(db_schema, db.history_table(table))))
            history_rows = cur.fetchone()[0]
    finally:
        conn.close()
    in_batch = current[current[quality.KEY].isin(batch[quality.KEY])]
    batch_fp, current_fp = quality.fingerprint(in_batch), quality.fingerprint(current)
    stage.record.output({"uri": f"postgresql://{settings.db.host}:{settings.db.port}/{settings.db.name}"
                                f"/{db_schema}.{table}", "rows": len(current),
                         "inputs": [f"s3://{settings.clean_bucket}/{obj['key']}"], "role": "database"})
    stage.record.update(rows_in=len(batch), rows_out=len(current), **result, schema=db_schema, table=table,
                        batch_rows=batch_fp["rows"], batch_fingerprint=batch_fp["fingerprint"],
                        current_fingerprint=current_fp["fingerprint"], history_rows=history_rows)
    return Loaded(result, current, history_rows)


# --- 4. PostgreSQL → cloud ----------------------------------------------------------------------------

def export_key(settings: config.Settings, table: str, run_id: str) -> str:
    prefix = f"{settings.cloud.prefix}/" if settings.cloud.prefix else ""
    return f"{prefix}{table}/run_id={run_id}/{table}.csv"


def export(stage: Stage, *, db_schema: str = "public", table: str = "capitals_clean",
           export_all_tables: bool = False) -> list[storage.Artifact]:
    """Stream each table with COPY ... TO STDOUT into the cloud bucket, under a run-scoped key and a
    stable `latest` key."""
    settings = stage.settings
    names.sql_identifier(db_schema, "schema")
    names.sql_identifier(table, "table")
    cloud = storage.cloud_client(settings.cloud)
    storage.ensure_bucket(cloud, settings.cloud.bucket, create=settings.cloud.emulated)
    conn = db.connect(settings.db, application_name=f"countries-medallion {stage.name} {stage.run_id}")
    artifacts = []
    try:
        if not db.table_exists(conn, db_schema, table):
            raise StageError(f"table {db_schema}.{table} does not exist: run 03_load first")
        tables = db.tables(conn, db_schema) if export_all_tables else [table]
        for name in [table] + [t for t in tables if t != table]:
            spool = storage.HashingSpool()
            try:
                rows = db.copy_out(conn, db_schema, name, spool, pipeline_table=name == table)
                key = export_key(settings, name, stage.run_id)
                if name == table:
                    fp = quality.fingerprint(transform.read_csv(spool.rewound().read()))
                    stage.record.update(rows=rows, fingerprint=fp["fingerprint"], sha256=spool.sha256, key=key)
                source_ref = (f"postgresql://{settings.db.host}:{settings.db.port}/{settings.db.name}"
                              f"/{db_schema}.{name}")
                artifact = storage.put_stream(
                    cloud, settings.cloud.bucket, key, spool.rewound(), size=spool.size, digest=spool.sha256,
                    rows=rows, inputs=[source_ref], role="cloud", content_type="text/csv",
                    metadata=_meta(stage, table=f"{db_schema}.{name}"))
            finally:
                spool.close()
            latest = key.replace(f"/run_id={stage.run_id}/", "/latest/")
            storage.copy(cloud, settings.cloud.bucket, key, latest)
            stage.record.output(artifact)
            artifacts.append(artifact)
    finally:
        conn.close()
    stage.record.update(rows_in=artifacts[0].rows, rows_out=artifacts[0].rows,
                        tables=[a.key for a in artifacts], cloud=settings.cloud.kind)
    return artifacts


# --- 5. cloud → gold ----------------------------------------------------------------------------------

@dataclass
class Golden:
    table: pd.DataFrame
    by_region: pd.DataFrame
    by_subregion: pd.DataFrame
    changes: dict
    reconciliation: pd.DataFrame | None
    artifacts: list[storage.Artifact]


def _previous_gold(s3, bucket: str, table: str, run_id: str) -> tuple[pd.DataFrame | None, str | None]:
    """The gold table of the previous successful run: the `latest` one, unless that is this run
    (a rerun), in which case the one it replaced."""
    latest = storage.head(s3, bucket, f"countries/latest/{table}.csv")
    if latest is None:
        return None, None
    previous = latest["metadata"].get("run-id")
    if previous == run_id:
        previous = latest["metadata"].get("previous-run-id") or None
    if not previous:
        return None, None
    data, _ = storage.get_bytes(s3, bucket, f"countries/run_id={previous}/{table}.csv")
    return transform.read_csv(data), previous


def build_gold(stage: Stage, *, table: str = "capitals_clean") -> Golden:
    """Fetch this run's export, verify its checksum against what stage 4 wrote, then write gold:
    the table, aggregates by region and subregion, the change report; reconcile every hop; and only
    then move the `latest` keys."""
    settings = stage.settings
    names.sql_identifier(table, "table")
    cloud = storage.cloud_client(settings.cloud)
    key = export_key(settings, table, stage.run_id)
    data, meta = storage.get_bytes(cloud, settings.cloud.bucket, key)
    digest = storage.sha256(data)
    exported = runs.read_stage(settings, stage.run_id, "04_export")
    expected = {"object metadata": meta.get("sha256")}
    if exported is not None:
        expected["stage 4 record"] = exported["details"].get("sha256")
    for where, value in expected.items():
        if value != digest:
            raise StageError(f"checksum mismatch for s3://{settings.cloud.bucket}/{key}: sha256 {digest} but "
                             f"{where} says {value}; nothing was written to gold")
    frame = transform.read_csv(data)
    s3 = storage.client(settings.store)
    storage.ensure_bucket(s3, settings.gold_bucket)
    previous, previous_id = _previous_gold(s3, settings.gold_bucket, table, stage.run_id)
    report = gold.changes(previous, frame, previous_id)
    by_region, by_subregion = gold.aggregates(frame, "region"), gold.aggregates(frame, "subregion")
    source_uri = f"s3://{settings.cloud.bucket}/{key}"
    meta_out = _meta(stage, **{"previous-run-id": previous_id})
    part = f"run_id={stage.run_id}"
    artifacts = [
        storage.put_bytes(s3, settings.gold_bucket, f"countries/{part}/{table}.csv", data, rows=len(frame),
                          inputs=[source_uri], metadata=meta_out, content_type="text/csv"),
        storage.put_bytes(s3, settings.gold_bucket, f"aggregates/{part}/by_region.csv",
                          by_region.to_csv(index=False).encode(), rows=len(by_region), inputs=[source_uri],
                          metadata=meta_out, content_type="text/csv"),
        storage.put_bytes(s3, settings.gold_bucket, f"aggregates/{part}/by_subregion.csv",
                          by_subregion.to_csv(index=False).encode(), rows=len(by_subregion),
                          inputs=[source_uri], metadata=meta_out, content_type="text/csv"),
        storage.put_bytes(s3, settings.gold_bucket, f"changes/{part}/changes.json",
                          json.dumps(report, indent=2, ensure_ascii=False, default=str).encode(),
                          rows=len(report["added"]) + len(report["removed"]) + len(report["changed"]),
                          inputs=[source_uri], metadata=meta_out, content_type="application/json"),
    ]
    for artifact in artifacts:
        stage.record.output(artifact)
    fp = quality.fingerprint(frame)
    stage.record.update(rows_in=len(frame), rows_out=len(frame), gold_rows=len(frame),
                        gold_fingerprint=fp["fingerprint"], gold_sha256=digest, previous_run_id=previous_id,
                        changes={k: len(v) for k, v in report.items() if k != "previous_run_id"})
    return Golden(frame, by_region, by_subregion, report, None, artifacts)


def reconcile(stage: Stage, golden: Golden) -> pd.DataFrame:
    """Counts and fingerprints at every hop of this run; raises naming the first hop that disagrees.
    The `latest` gold keys move only after this passes."""
    records = {s: runs.read_stage(stage.settings, stage.run_id, s) for s in runs.STAGES[:4]}
    details = stage.record.data["details"]
    try:
        table = gold.reconcile(records, {"rows": details["gold_rows"], "fingerprint": details["gold_fingerprint"],
                                         "sha256": details["gold_sha256"]})
    except gold.ReconciliationError as err:
        stage.record.update(reconciliation=str(err))
        raise
    stage.record.update(reconciliation=table.to_dict(orient="records"))
    s3 = storage.client(stage.settings.store)
    for artifact in golden.artifacts:
        storage.copy(s3, artifact.bucket, artifact.key, artifact.key.replace(f"/run_id={stage.run_id}/", "/latest/"))
    golden.reconciliation = table
    return table


# --- previews ---------------------------------------------------------------------------------------

def preview(frame: pd.DataFrame, rows: int = 10, by: str | None = quality.KEY) -> pd.DataFrame:
    """A small, sorted preview with long text cut short, so run records stay light."""
    out = frame.sort_values(by).head(rows) if by and by in frame else frame.head(rows)
    return out.map(lambda v: (v[:60] + "…") if isinstance(v, str) and len(v) > 61 else v)


def schema(frame: pd.DataFrame) -> pd.DataFrame:
    """Column, dtype, non-null count and an example value."""
    return pd.DataFrame({
        "column": frame.columns,
        "dtype": [str(t) for t in frame.dtypes],
        "non_null": [int(frame[c].notna().sum()) for c in frame.columns],
        "example": [str(frame[c].dropna().iloc[0])[:40] if frame[c].notna().any() else "" for c in frame.columns],
    })
