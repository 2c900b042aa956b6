"""What each stage does, as plain functions the notebooks call (and tests call directly).

A notebook is: parameters → `begin()` → one or two calls here → previews. Every function takes the
`Stage` context, writes objects with metadata, and fills the stage record that `finish()` saves.
Where objects go is lib/layout.py; how they are encoded is lib/formats.py; which stage feeds which is
lib/registry.py.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import logging
import os
import shutil
import sys
import tempfile
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
    uri = f"s3://{bucket}/{key}"
    expected = expected_sha256(stage, uri, layer, meta, required=required, against_record=against_record)
    prove(stage, uri, storage.sha256(data), expected)
    return data, meta


def expected_sha256(stage: Stage, uri: str, layer: str, meta: dict, *, required: bool = True,
                    against_record: bool = True) -> dict[str, str | None]:
    """What each witness says an input object's sha256 is: its own metadata and, unless
    `against_record` is off, the record of the stage that wrote `layer` (which must exist when
    `required`). One place for the proof `verify_input` and the streamed readers make."""
    expected = {"the object's metadata": meta.get("sha256")}
    record = stage.previous_record(layer) if against_record else None
    if record is not None:
        listed = [a.get("sha256") for a in record.get("artifacts", []) if a.get("uri") == uri]
        expected[f"the {record['stage']} record of run {record['run_id']}"] = listed[-1] if listed else "nothing (not listed)"
    elif required and against_record:
        writer = registry.writer_of(layer).name
        raise StageError(f"{uri}: no {writer} record to check it against in run {stage.input_run(layer)}; "
                         f"run {writer} first; nothing was written")
    return expected


def prove(stage: Stage, uri: str, digest: str, expected: dict[str, str | None]) -> None:
    """Raise StageError naming the first witness whose sha256 is not the one read."""
    for where, value in expected.items():
        if value != digest:
            raise StageError(f"checksum mismatch for {uri}: sha256 {digest} but {where} says {value}; "
                             f"nothing was written by {stage.name}")


# --- 1. ingest -----------------------------------------------------------------------------------

SAMPLE_RECORDS = 1000  # records kept for previews (the payload itself is never held whole)


@dataclass
class Ingested:
    origin: str
    records: int  # how many records the payload holds
    sample: list[dict]  # the first SAMPLE_RECORDS of them, for previews
    drift: dict  # quality.drift of every record
    artifact: storage.Artifact
    attempts: list[dict] = field(default_factory=list)
    reused: bool = False


class _Scan:
    """A payload read once as it streams in: checked record by record (lib/source.py PayloadReader;
    only each record's fields are decoded, since only they are counted), counted and hashed, its
    first records decoded whole and kept as a sample, its fields counted for drift."""

    def __init__(self, min_records: int, hashing: bool = True):
        self.reader = source.PayloadReader(min_records, shallow=True)
        self.hash = hashlib.sha256() if hashing else None
        self.sample: list[dict] = []
        self.drift = quality.Drift()

    def feed(self, chunk: bytes) -> None:
        if self.hash is not None:
            self.hash.update(chunk)
        self._take(self.reader.feed(chunk))

    def close(self) -> "_Scan":
        self._take(self.reader.close())
        return self

    def _take(self, records: list[dict]) -> None:
        if records:
            self.drift.add(records)
            if len(self.sample) < SAMPLE_RECORDS:
                self.sample += map(source.full, records[:SAMPLE_RECORDS - len(self.sample)])

    def read(self, fileobj) -> "_Scan":
        while chunk := fileobj.read(source.CHUNK_BYTES):
            self.feed(chunk)
        return self.close()


def ingest(stage: Stage, *, api_url: str = "", snapshot_fallback: str = "auto", min_records: int = 1,
           **fetch_options) -> Ingested:
    """API → raw bucket, bytes unchanged (lib/layout.py `raw_key`). The answer is spooled to a
    temporary file as it arrives and checked record by record before anything is written, then
    uploaded in parts. A run's bronze is written once: running the stage again for the same run
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
        body, meta = storage.open_object(s3, settings.raw_bucket, key)
        try:
            with _young_gc_only():
                scan = _Scan(min_records).read(body)
        finally:
            body.close()
        artifact = storage.Artifact(settings.raw_bucket, key, scan.reader.size, scan.hash.hexdigest(),
                                    scan.reader.items, [meta.get("source-url", url)])
        log.info("run %s already has bronze at %s: reusing it", stage.run_id, artifact.uri)
        result = Ingested(meta.get("source", "api"), scan.reader.items, scan.sample, scan.drift.result(),
                          artifact, reused=True)
    else:
        with _young_gc_only():  # checked as it arrives: raises before anything is written
            fetched = source.fetch_or_snapshot(url, fallback=fallback, consume=lambda: _Scan(min_records, hashing=False),
                                               **fetch_options)
        scan = fetched.consumer
        try:
            origin_ref = url if fetched.origin == "api" else f"bundled snapshot lib/data/{source.SNAPSHOT}"
            artifact = storage.put_stream(
                s3, settings.raw_bucket, layout.raw_key(stage.run_id), fetched.rewound(), size=fetched.size,
                digest=fetched.sha256, rows=scan.reader.items, inputs=[origin_ref],
                metadata=stage.meta(source=fetched.origin, **{"source-url": url}), content_type="application/json")
        finally:
            fetched.close()
        result = Ingested(fetched.origin, scan.reader.items, scan.sample, scan.drift.result(), artifact,
                          fetched.attempts)
        stage.record.update(fallback_reason=fetched.fallback_reason)
    records = result.records
    stage.record.output(result.artifact)
    stage.record.update(rows_in=records, rows_out=records, origin=result.origin,
                        records=records, response_sha256=result.artifact.sha256,
                        attempts=result.attempts, reused=result.reused, url=url)
    return result


# --- 2. raw → clean ------------------------------------------------------------------------------

CHUNK_ROWS = 10_000  # records flattened, validated and written at a time


@dataclass
class Checked:
    """What validation found, for a table that is never held whole: the clean rows are in a
    temporary Parquet file (`Prepared.silver`), a sample of them is here for previews."""
    rows: int  # clean rows
    quarantine: pd.DataFrame  # record, raw_object, name_common, reasons, source
    duplicates: dict  # key → how its copies were settled
    sample: pd.DataFrame  # the first clean rows (up to SAMPLE_RECORDS), typed, with _row_hash

    @property
    def counts(self) -> dict:
        return {"clean": self.rows, "quarantined": len(self.quarantine),
                "records": self.rows + len(self.quarantine)}


def _silver_schema():
    import pyarrow as pa

    kinds = {"text": pa.string(), "text[]": pa.list_(pa.string()), "bigint": pa.int64(), "double": pa.float64()}
    return pa.schema([pa.field(c.name, kinds[c.kind]) for c in contract.CONTRACT] + [pa.field("_row_hash", pa.string())])


def _frame_of(table) -> pd.DataFrame:
    """A Parquet row group of the silver table as the typed frame validation made."""
    frame = pd.DataFrame({name: pd.Series(table.column(name).to_pylist(), dtype=object) for name in table.column_names})
    frame["population"] = frame["population"].astype("int64")
    frame["area"] = frame["area"].astype("float64")
    return frame


@contextlib.contextmanager
def _young_gc_only():
    """Parsing and flattening make millions of small containers that live for one chunk: the
    cyclic collector, left to itself, goes through every one of them again and again (it tripled
    the time of a chunk). It is paused meanwhile: parsed JSON holds no cycles, and what is freed
    is freed by reference counting as each chunk goes."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Silver:
    """The clean rows of stage 2 in a temporary Parquet file, one row group per chunk, with the
    record id of every row, the running fingerprint and a sample for previews. The file is removed
    by `discard` (write_clean does once it has uploaded it), else when this object goes."""

    def __init__(self):
        import weakref

        self.dir = tempfile.mkdtemp(prefix="silver-")
        self.path = os.path.join(self.dir, "clean.parquet")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.dir, True)
        self.schema = _silver_schema()
        self.writer = None
        self.rows = 0
        self.ids: list = []  # per row group: the record ids of its rows
        self.fingerprint = quality.Fingerprint()
        self.samples: list[pd.DataFrame] = []

    def write(self, frame: pd.DataFrame, ids) -> None:
        """Write typed rows; their `_row_hash` is computed here from the Arrow table written (the
        hashes `quality.row_hashes` gives, in Arrow's kernels) unless the frame has it already."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")
        if "_row_hash" in frame:
            frame = frame[contract.COLUMNS + ["_row_hash"]]
            table = pa.Table.from_pandas(frame, schema=self.schema, preserve_index=False)
        else:
            frame = frame[contract.COLUMNS]
            table = pa.Table.from_pandas(frame, schema=pa.schema(list(self.schema)[:-1]), preserve_index=False)
            table = table.append_column(self.schema.field("_row_hash"),
                                        pa.array(quality.arrow_row_hashes(table), pa.string()))
        self.writer.write_table(table)
        hashes = table.column("_row_hash")
        self.ids.append(np.asarray(ids, dtype="int64"))
        self.rows += len(frame)
        self.fingerprint.add(frame, hashes=hashes.combine_chunks())
        taken = sum(len(f) for f in self.samples)
        if taken < SAMPLE_RECORDS:
            head = frame.head(SAMPLE_RECORDS - taken).reset_index(drop=True)
            self.samples.append(head.assign(_row_hash=pd.Series(hashes.slice(0, len(head)).to_pylist(), dtype=object)))

    def close(self) -> None:
        import numpy as np
        import pyarrow.parquet as pq

        if self.writer is None:  # no clean row: an empty table with the columns
            self.writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")
            self.writer.write_table(self.schema.empty_table())
            self.ids.append(np.zeros(0, dtype="int64"))
        self.writer.close()
        self.writer = None
        self.result = self.fingerprint.result()

    @property
    def sample(self) -> pd.DataFrame:
        if self.samples:
            return pd.concat(self.samples, ignore_index=True)
        return _frame_of(self.schema.empty_table())

    def drop(self, ids) -> None:
        """Rewrite the file without the rows of these record ids (copies settled across chunks)."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        ids = np.asarray(sorted(ids), dtype="int64")
        if not any(np.isin(group, ids).any() for group in self.ids):
            return
        source_path, self.path = self.path, os.path.join(self.dir, "clean-settled.parquet")
        old_ids, self.ids, self.rows, self.samples = self.ids, [], 0, []
        self.fingerprint = quality.Fingerprint()
        parquet = pq.ParquetFile(source_path)
        for group, group_ids in enumerate(old_ids):
            keep = ~np.isin(group_ids, ids)
            if not keep.any():
                continue
            table = parquet.read_row_group(group)
            if not keep.all():
                table = table.filter(pa.array(keep))
            self.write(_frame_of(table), group_ids[keep])
        parquet.close()
        os.remove(source_path)
        self.close()

    def digest(self) -> tuple[int, str]:
        sha = hashlib.sha256()
        with open(self.path, "rb") as f:
            while chunk := f.read(source.CHUNK_BYTES):
                sha.update(chunk)
        return os.path.getsize(self.path), sha.hexdigest()

    def frames(self):
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(self.path)
        try:
            for group in range(parquet.num_row_groups):
                yield _frame_of(parquet.read_row_group(group))
        finally:
            parquet.close()

    def discard(self) -> None:
        self._cleanup()


@dataclass
class Prepared:
    validated: Checked
    raw_objects: list[dict]
    drift: dict
    superseded: int
    date: str
    backfill_date: str = ""
    data_as_of: str | None = None  # when the newest bronze object read was written
    silver: _Silver | None = None  # the clean rows, written by write_clean

    @property
    def raw_records(self) -> int:
        return sum(o["records"] for o in self.raw_objects)


def _group_key(value):
    """A record's key as bytes to group copies by (a key holding a lone surrogate, quarantined
    later, must not break this); None for a missing key."""
    if isinstance(value, str):
        return b"s" + value.encode("utf-8", "surrogatepass")
    if value is None or (isinstance(value, float) and value != value):
        return None
    return b"o" + f"{type(value).__name__}:{value!r}".encode("utf-8", "backslashreplace")


def _stream_raw(stage: Stage, s3, key: str, *, against_record: bool, min_records: int, rows: int = CHUNK_ROWS):
    """The records of one raw object in lists of `rows`, parsed as the object streams in. Its
    sha256 is compared with its metadata (and, for this run's own bronze, stage 1's record) once
    it has been read; a mismatch is the error reported even when the bytes also fail to parse.
    Yields (records, first position); returns (records, sha256)."""
    bucket = stage.settings.raw_bucket
    uri = f"s3://{bucket}/{key}"
    body, meta = storage.open_object(s3, bucket, key)
    expected = expected_sha256(stage, uri, "raw", meta, required=False, against_record=against_record)
    sha, reader, pending, position, problem = hashlib.sha256(), source.PayloadReader(min_records), [], 0, None
    chunks = storage.read_ahead(body, source.CHUNK_BYTES, sha)  # read and hashed while the last is parsed
    try:
        for chunk in chunks:
            if problem is not None:
                continue  # read on: a checksum mismatch says more than a parse error
            try:
                pending += reader.feed(chunk) if chunk else reader.close()
            except source.PayloadError as err:
                problem = err
                continue
            while len(pending) >= rows or (pending and not chunk):
                batch, pending = pending[:rows], pending[rows:]
                yield batch, position
                position += len(batch)
    finally:
        chunks.close()
        body.close()
    digest = sha.hexdigest()
    prove(stage, uri, digest, expected)
    if problem is not None:
        raise StageError(f"{uri}: {problem}; nothing was written") from None
    return reader.items, digest


def prepare_clean(stage: Stage, *, backfill_date: str = "", min_records: int = 1) -> Prepared:
    """Read every raw object of the run (or, with backfill_date, of that date) as it streams in,
    and flatten, validate and write the clean rows to a temporary Parquet file CHUNK_ROWS records
    at a time; nothing is written to the object store here. When several objects hold the same
    country, the newest object wins and the older copies count as superseded; copies of a key
    within the winning object are settled as `quality.duplicates` does. Both are decided at the
    end from each record's key and object alone, and the rows they remove are filtered out of the
    file then (the record rules' reasons for a superseded record are dropped, as before)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

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
    # Bronze put in place by hand has no stage 1 record: its metadata is checked. A backfill reads
    # other runs' bronze too: checked against their metadata.
    against = [layout.run_of(o["key"]) == source_run for o in objects]
    silver, drift = _Silver(), quality.Drift()
    quarantine: dict[int, list] = {}  # record id → [name_common, reasons, source]
    keys, strings, starts, raw = [], [], [], []
    try:
        with _young_gc_only():
            _first_pass(stage, s3, objects, against, min_records, silver, drift, quarantine, keys, strings, starts, raw)
    except BaseException:
        silver.discard()  # a failed stage's traceback may keep `silver` alive as long as its kernel
        raise

    # Settle keys: across objects the newest copy wins; within one object copies are compared.
    total = sum(o["records"] for o in raw)
    codes = (pc.fill_null(pc.dictionary_encode(pa.concat_arrays(keys)).indices, -1).to_numpy().astype("int64")
             if total else np.zeros(0, dtype="int64"))
    object_of = np.repeat(np.arange(len(raw)), [o["records"] for o in raw])
    has_key = codes >= 0
    safe_codes = np.where(has_key, codes, 0)
    newest = np.full(int(codes.max()) + 1 if total and has_key.any() else 1, -1)
    np.maximum.at(newest, codes[has_key], object_of[has_key])
    superseded = has_key & (object_of < newest[safe_codes])
    candidates = (np.concatenate(strings) if strings else np.zeros(0, dtype=bool)) & ~superseded
    copies = np.bincount(codes[candidates], minlength=len(newest))
    duplicated = np.flatnonzero(candidates & (copies[safe_codes] >= 2))
    drop = set(np.flatnonzero(superseded).tolist())
    for record in drop:
        quarantine.pop(record, None)
    summary = {}
    if len(duplicated):
        found = _copies(stage, s3, objects, against, starts, set(duplicated.tolist()), min_records, quarantine)
        groups: dict[int, list] = {}
        for record in duplicated.tolist():
            groups.setdefault(int(codes[record]), []).append(record)
        for members in groups.values():
            key = found[members[0]][0]
            reasons, summary[quality.safe_text(key)] = quality.settle_copies(
                key, [(r, found[r][1]) for r in members])
            for record, reason in reasons.items():
                if record in quarantine:
                    quarantine[record][1].append(reason)
                else:
                    quarantine[record] = [quality.safe_text(key), [reason], found[record][2]]
                    drop.add(record)
    silver.close()
    if drop:
        silver.drop(drop)

    bad = sorted(quarantine)
    out = pd.DataFrame(
        {
            "record": [int(r - starts[object_of[r]]) for r in bad],
            "raw_object": [raw[object_of[r]]["uri"] for r in bad],
            "name_common": [quarantine[r][0] for r in bad],
            "reasons": [quality.safe_text("; ".join(quarantine[r][1])) for r in bad],
            "source": [quarantine[r][2] for r in bad],
        },
        columns=["record", "raw_object", "name_common", "reasons", "source"],
    )
    checked = Checked(silver.rows, out, summary, silver.sample)
    date = backfill_date or layout.date_of(objects[0]["key"])
    fetched = max(o["last_modified"] for o in objects).isoformat()
    return Prepared(checked, raw, drift.result(), int(superseded.sum()), date, backfill_date, fetched, silver)


def _first_pass(stage, s3, objects, against, min_records, silver, drift, quarantine, keys, strings, starts, raw):
    """Every raw object, a chunk at a time: flattened, validated, its clean rows written to `silver`,
    its bad ones kept in `quarantine`, every record's key kept for settling copies."""
    import numpy as np
    import pyarrow as pa

    settings = stage.settings
    for number, obj in enumerate(objects):
        start = sum(o["records"] for o in raw)
        starts.append(start)
        stream = _stream_raw(stage, s3, obj["key"], against_record=against[number], min_records=min_records)
        while True:
            try:
                records, position = next(stream)
            except StopIteration as done:
                count, digest = done.value
                break
            first = start + position
            drift.add(records)
            frame = transform.flatten(records)
            names = frame[contract.KEY].tolist()
            keys.append(pa.array([_group_key(k) for k in names], type=pa.binary()))
            strings.append(np.array([isinstance(k, str) for k in names], dtype=bool))
            reasons = quality.record_reasons(frame)
            for i in sorted(reasons):
                quarantine[first + i] = [quality.safe_text(names[i]), reasons[i], quality.source_json(records[i])]
            del records
            good = frame.drop(index=list(reasons)) if reasons else frame
            if len(good):
                silver.write(quality.typed(good, unique=False), first + good.index.to_numpy())  # hashed there
            del frame, good
        raw.append({"uri": f"s3://{settings.raw_bucket}/{obj['key']}", "records": count, "sha256": digest})


def _copies(stage: Stage, s3, objects, against, starts, wanted: set[int], min_records: int,
            quarantine: dict) -> dict[int, tuple]:
    """The records that share a key, read again from their raw objects: (key, copy shape, source
    JSON when not already quarantined) by record id. Only payloads with duplicate keys pay this."""
    found = {}
    for number, obj in enumerate(objects):
        start = starts[number]
        end = starts[number + 1] if number + 1 < len(starts) else float("inf")
        if not any(start <= r < end for r in wanted):
            continue
        stream = _stream_raw(stage, s3, obj["key"], against_record=against[number], min_records=min_records)
        for records, position in stream:
            for offset, record in enumerate(records):
                rid = start + position + offset
                if rid in wanted:
                    row = transform.flatten_record(record)
                    found[rid] = (row[contract.KEY], quality.copy_shape(row[c] for c in contract.COLUMNS),
                                  None if rid in quarantine else quality.source_json(record))
    return found


def write_clean(stage: Stage, prepared: Prepared, *, max_invalid_fraction: float = 0.05,
                silver_format: str = "") -> list[storage.Artifact]:
    """Check the share of bad records, then write the clean table and the quarantine with reasons,
    in `silver_format` ('' for lib/formats.py's default). The clean table is uploaded from the file
    prepare_clean wrote (Parquet as it is; CSV encoded a row group at a time)."""
    settings = stage.settings
    fmt = formats.get(silver_format or formats.SILVER)
    counts = prepared.validated.counts
    total = counts["records"]
    fraction = counts["quarantined"] / total if total else 1.0
    silver = prepared.silver
    if not os.path.exists(silver.path):
        raise StageError("these prepared rows were written (or discarded) already: run prepare_clean again")
    if fraction > max_invalid_fraction:
        silver.discard()
        raise StageError(
            f"{counts['quarantined']} of {total} records ({fraction:.1%}) break the contract, more than "
            f"max_invalid_fraction={max_invalid_fraction:.1%}; nothing was written to {settings.clean_bucket!r}")
    s3 = storage.client(settings.store)
    storage.ensure_bucket(s3, settings.clean_bucket)
    inputs = [o["uri"] for o in prepared.raw_objects]
    rows = silver.rows
    meta = stage.meta(**{"contract-version": contract.VERSION, "format": fmt.name})
    clean_key = layout.clean_key(prepared.date, stage.run_id, fmt.extension)
    if fmt.name == "parquet":
        size, digest = silver.digest()
        with open(silver.path, "rb") as f:
            clean = storage.put_stream(s3, settings.clean_bucket, clean_key, f, size=size, digest=digest, rows=rows,
                                       inputs=inputs, content_type=fmt.content_type, metadata=meta)
    else:
        spool = storage.HashingSpool()
        try:
            for number, frame in enumerate(silver.frames()):
                data = fmt.encode(frame)
                spool.write(data if number == 0 else data[data.index(b"\n") + 1:])  # one header
            clean = storage.put_stream(s3, settings.clean_bucket, clean_key, spool.rewound(), size=spool.size,
                                       digest=spool.sha256, rows=rows, inputs=inputs,
                                       content_type=fmt.content_type, metadata=meta)
        finally:
            spool.close()
    silver.discard()  # uploaded: the temporary file goes now (a kernel may be killed rather than ended)
    quarantine = prepared.validated.quarantine
    artifacts = [clean, storage.put_bytes(
        s3, settings.clean_bucket, layout.quarantine_key(prepared.date, stage.run_id, fmt.extension),
        fmt.encode(quarantine), rows=len(quarantine), inputs=inputs, content_type=fmt.content_type, metadata=meta)]
    for artifact in artifacts:
        stage.record.output(artifact)
    raw_sha = (prepared.raw_objects[0]["sha256"] if len(prepared.raw_objects) == 1
               else storage.sha256("".join(o["sha256"] for o in prepared.raw_objects).encode()))
    silver_records = rows + counts["quarantined"] + prepared.superseded
    breakdown = f"{rows} + {counts['quarantined']}" + (
        f" + {prepared.superseded} superseded" if prepared.superseded else "")
    stage.record.update(
        rows_in=prepared.raw_records, rows_out=rows, raw_objects=prepared.raw_objects,
        raw_records=prepared.raw_records, raw_sha256=raw_sha, clean_rows=rows,
        quarantined=counts["quarantined"], superseded=prepared.superseded, invalid_fraction=round(fraction, 6),
        silver_records=silver_records, silver_breakdown=breakdown,
        clean_fingerprint=silver.result["fingerprint"], drift=prepared.drift,
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
    fmt = formats.of_key(obj["key"])
    conn = stage.db_connection()
    try:
        # The CSV that COPY reads, converted in Arrow batches by a thread while PostgreSQL copies the
        # previous ones (a conversion error fails the COPY, so nothing is loaded).
        with db.fed(lambda sink: formats.copy_csv(data, fmt.name, sink)) as (csv_rows, converted):
            try:
                # The batch is proven inside the merge, and the whole table's fingerprint recomputed
                # from its stored values in the same transaction.
                result = db.merge(conn, csv_rows, schema=db_schema, table=table, run_id=stage.run_id,
                                  mode=write_mode, retire_missing=retire_missing,
                                  expected_fingerprint=cleaned.get("clean_fingerprint"),
                                  data_as_of=cleaned.get("data_as_of"), allow_rewind=allow_rewind, lists="array")
            except db.DatabaseError as err:
                raise StageError(str(err)) from None
        batch_rows = converted["result"]
        data = None  # the silver bytes (the converting thread's closure holds the same cell)
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

    def copy_table(name: str, *sinks) -> int:
        tee = storage.Tee(*sinks)
        rows = db.copy_out(conn, db_schema, name, formats.UpperHeader(tee) if column_case == "upper" else tee,
                           pipeline_table=name == table)
        tee.flush()
        return rows

    try:
        if not db.table_exists(conn, db_schema, table):
            raise StageError(f"table {db_schema}.{table} does not exist: run {registry.writer_of('table').name} first")
        tables = db.tables(conn, db_schema) if export_all_tables else [table]
        for name in [table] + [t for t in tables if t != table]:
            key = layout.export_key(settings.cloud.prefix, name, stage.run_id)
            spool = storage.HashingSpool()
            try:
                if name != table:
                    rows = copy_table(name, spool)
                else:  # the fingerprint of the exported bytes, parsed in Arrow batches as COPY writes them
                    fp = quality.Fingerprint()
                    with db.streamed(lambda pipe: copy_table(table, spool, pipe)) as (stream, done):
                        for batch in formats.csv_arrow_batches(stream):
                            fp.add(batch)
                    rows, fp = done["result"], fp.result()
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
    # The change report (lib/gold.py `changes`) with its added and removed keys cut to the first
    # CHANGES_SAMPLE (changes.json has them all) and "counts": how many were added, removed, changed.
    changes: dict
    reconciliation: pd.DataFrame | None
    artifacts: list[storage.Artifact]


# The columns the aggregates read (lib/gold.py): only these are taken out of Arrow into pandas.
AGGREGATE_COLUMNS = [contract.KEY, "region", "subregion", "population", "area"]
CHANGES_SAMPLE = 1000  # added and removed keys kept in `Golden.changes` (a first table adds every key)


def _release_arrow() -> None:
    """Hand back to the system the memory Arrow's allocator keeps after a large step (its pool may hold
    freed pages for reuse: with mimalloc some 100 MiB after converting a million rows)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


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


def _spooled_input(stage: Stage, s3, bucket: str, key: str, layer: str, read=None):
    """`verify_input` for an object too large to hold: streamed to a spool on disk while hashed, then
    its sha256 proven against its metadata and the writer's record (when there is one), before
    anything is written. `read`, when given, reads the object as it downloads (a file object read
    forward only, lib/formats.py ForwardReader) and its result is returned with the spool; what it
    raises is raised after the proof, so a changed object is reported as changed. Close the spool
    after use."""
    body, meta = storage.open_object(s3, bucket, key)
    spool = storage.HashingSpool()
    result, failure = None, None
    try:
        stream = formats.ForwardReader(body, sink=spool)
        if read is not None:
            try:
                result = read(stream)
            except Exception as err:  # noqa: BLE001 - raised below, once the bytes are proven
                failure = err
        while stream.read(8 << 20):
            pass
    except BaseException:
        spool.close()
        raise
    finally:
        body.close()
    uri = f"s3://{bucket}/{key}"
    try:
        prove(stage, uri, spool.sha256, expected_sha256(stage, uri, layer, meta, required=False))
        if failure is not None:
            raise failure
    except BaseException:
        spool.close()
        raise
    return spool, result


def build_gold(stage: Stage, *, table: str = "capitals_clean", gold_format: str = "") -> Golden:
    """Fetch this run's export, verify its checksum against what stage 4 wrote, then write gold:
    the table, aggregates by region and subregion, the change report. `reconcile` and `publish`
    follow. The export is converted to typed Parquet in Arrow batches as it downloads (used once its
    sha256 is proven); the aggregates read only their columns and the change report compares column
    by column (lib/gold.py `changes_arrow`), its keys written to changes.json as they are encoded."""
    settings = stage.settings
    params.check("table", table)
    fmt = formats.get(gold_format or formats.GOLD)
    cloud = storage.cloud_client(settings.cloud)
    key = layout.export_key(settings.cloud.prefix, table, stage.input_run("cloud"))
    # Converted to typed Parquet as it downloads; used only once its sha256 is proven.
    spool, (typed, rows) = _spooled_input(stage, cloud, settings.cloud.bucket, key, "cloud", formats.csv_to_parquet)
    digest = spool.sha256
    try:
        _release_arrow()
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


def _shared_text(column):
    """An Arrow text column as an object array in which equal values are one Python string: a million
    rows of a dozen regions hold a dozen strings, not a million (nulls stay None)."""
    import numpy as np
    import pyarrow.compute as pc

    encoded = column.combine_chunks().dictionary_encode()
    values = np.array([*encoded.dictionary.to_pylist(), None], dtype=object)
    return values[pc.fill_null(encoded.indices, len(encoded.dictionary)).to_numpy()]


def _write_gold(stage: Stage, fmt: formats.Format, table: str, key: str, typed: bytes, rows: int, fp: dict,
                digest: str, gold_body) -> Golden:
    """The rest of `build_gold`: the change report, the aggregates and every gold object."""
    import pyarrow.parquet as pq

    settings = stage.settings
    s3 = storage.client(settings.store)
    storage.ensure_bucket(s3, settings.gold_bucket)
    previous, previous_id = _previous_gold(s3, settings.gold_bucket, table, stage.run_id)
    report = gold.changes_arrow(previous, typed, previous_id)
    del previous
    counts = {name: len(report[name]) for name in ("added", "removed", "changed")}
    changes = storage.HashingSpool()  # changes.json, written as it is encoded
    try:
        gold.write_changes(report, changes)
        report = {**report, "added": report["added"][:CHANGES_SAMPLE].to_pylist(),
                  "removed": report["removed"][:CHANGES_SAMPLE].to_pylist(), "counts": counts}
        columns = pq.read_table(io.BytesIO(typed), columns=AGGREGATE_COLUMNS)
        # The keys (a million different ones) stay in Arrow as pandas' string dtype; the other text
        # columns hold a few values each, as shared Python strings.
        frame = pd.DataFrame({name: columns.column(name).to_pandas(types_mapper={
                                  columns.schema.field(name).type: pd.StringDtype("pyarrow")}.get)
                              if name == contract.KEY else pd.Series(_shared_text(columns.column(name)), dtype=object)
                              if name in contract.TEXT_COLUMNS else columns.column(name).to_numpy()
                              for name in AGGREGATE_COLUMNS})
        del columns
        aggregates = {name: fn(frame) for name, fn in gold.AGGREGATES.items()}
        del frame
        _release_arrow()
        sample = formats.parquet_decode(typed, rows=10)
        source_uri = f"s3://{settings.cloud.bucket}/{key}"
        meta_out = stage.meta(**{"previous-run-id": previous_id, "format": fmt.name})
        outputs = [
            (layout.gold_table_key(table, stage.run_id, fmt.extension), gold_body, rows, fmt.content_type),
            *((layout.aggregate_key(name, stage.run_id, fmt.extension), fmt.encode(agg), len(agg), fmt.content_type)
              for name, agg in aggregates.items()),
            (layout.changes_key(stage.run_id), changes, sum(counts.values()), "application/json"),
        ]
        artifacts = [storage.put_stream(s3, settings.gold_bucket, k, body.rewound(), size=body.size,
                                        digest=body.sha256, rows=n, inputs=[source_uri], metadata=meta_out,
                                        content_type=content_type)
                     if isinstance(body, storage.HashingSpool) else
                     storage.put_bytes(s3, settings.gold_bucket, k, body, rows=n, inputs=[source_uri],
                                       metadata=meta_out, content_type=content_type)
                     for k, body, n, content_type in outputs]
    finally:
        changes.close()
    for artifact in artifacts:
        stage.record.output(artifact)
    stage.record.update(rows_in=rows, rows_out=rows, gold_rows=rows,
                        gold_fingerprint=fp["fingerprint"], gold_sha256=digest, previous_run_id=previous_id,
                        format=fmt.name, changes=counts,
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
