"""Stage 2: raw → the clean (silver) bucket: flattened, typed, validated against the contract, bad
records quarantined with their reasons."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
import weakref

import pandas as pd

from lib import contract, formats, layout, quality, registry, source, storage, transform
from lib.registry import Layer
from lib.stages.context import (SAMPLE_RECORDS, StageError, StageRun, expected_sha256, prove, run_objects,
                                young_gc_only)


# Records flattened, validated and written at a time (a row group of the silver file each). With
# 100,000 records, chunks of 10,000 took stage 2 ~40 MiB higher than chunks of 5,000, which are no
# slower (250,000 records: 9.2-11.0 s against 9.5-11.2 s).
CHUNK_ROWS = 5_000


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

    return pa.schema([pa.field(c.name, formats.arrow_type(c.type)) for c in contract.CONTRACT]
                     + [pa.field("_row_hash", pa.string())])


def _frame_of(table) -> pd.DataFrame:
    """A Parquet row group of the silver table as the typed frame validation made."""
    frame = pd.DataFrame({name: pd.Series(table.column(name).to_pylist(), dtype=object) for name in table.column_names})
    for name in contract.TYPED_COLUMNS:
        frame[name] = frame[name].astype(contract.column(name).dtype)
    return frame


class _Silver:
    """The clean rows of stage 2 in a temporary Parquet file, one row group per chunk, with the
    record id of every row, the running fingerprint and a sample for previews. The file is removed
    by `discard` (`write` does once it has uploaded it), else when this object goes."""

    def __init__(self):

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
    silver: _Silver | None = None  # the clean rows, written by `write`

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


def _stream_raw(stage: StageRun, s3, key: str, *, against_record: bool, min_records: int):
    """The records of one raw object in lists of `rows`, parsed as the object streams in. Its
    sha256 is compared with its metadata (and, for this run's own bronze, stage 1's record) once
    it has been read; a mismatch is the error reported even when the bytes also fail to parse.
    Yields (records, first position) CHUNK_ROWS records at a time; returns (records, sha256)."""
    bucket = stage.settings.raw_bucket
    uri = f"s3://{bucket}/{key}"
    body, meta = storage.open_object(s3, bucket, key)
    expected = expected_sha256(stage, uri, Layer.RAW, meta, required=False, against_record=against_record)
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
            while len(pending) >= CHUNK_ROWS or (pending and not chunk):
                batch, pending = pending[:CHUNK_ROWS], pending[CHUNK_ROWS:]
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


@dataclass
class _Pass:
    """One reading of a run's raw objects, a chunk at a time: what `prepare` keeps of every record
    (its key, whether it is text, which object holds it) for settling copies at the end, the clean
    rows written to `silver`, the bad ones in `quarantine` (record id → [name_common, reasons,
    source]). A record's id is its position among all the objects' records."""
    stage: StageRun
    s3: object
    objects: list[dict]
    against: list[bool]  # per object: checked against the writer's record too (else its metadata)
    min_records: int
    silver: _Silver = field(default_factory=lambda: _Silver())
    drift: quality.Drift = field(default_factory=quality.Drift)
    quarantine: dict[int, list] = field(default_factory=dict)
    keys: list = field(default_factory=list)  # per chunk: the records' keys as Arrow binary (`_group_key`)
    strings: list = field(default_factory=list)  # per chunk: whether each key is text
    starts: list[int] = field(default_factory=list)  # per object: the id of its first record
    raw: list[dict] = field(default_factory=list)  # per object: uri, records, sha256

    def records(self, number: int):
        """The records of object `number` in chunks: (records, position within the object)."""
        return _stream_raw(self.stage, self.s3, self.objects[number]["key"], against_record=self.against[number],
                           min_records=self.min_records)

    def read(self) -> None:
        """Every object: flattened, validated, its clean rows written to `silver`, its bad ones kept
        in `quarantine`, every record's key kept for settling copies."""
        import numpy as np
        import pyarrow as pa

        for number, obj in enumerate(self.objects):
            start = sum(o["records"] for o in self.raw)
            self.starts.append(start)
            stream = self.records(number)
            while True:
                try:
                    records, position = next(stream)
                except StopIteration as done:
                    count, digest = done.value
                    break
                first = start + position
                self.drift.add(records)
                frame = transform.flatten(records)
                names = frame[contract.KEY].tolist()
                self.keys.append(pa.array([_group_key(k) for k in names], type=pa.binary()))
                self.strings.append(np.array([isinstance(k, str) for k in names], dtype=bool))
                reasons = quality.record_reasons(frame)
                for i in sorted(reasons):
                    self.quarantine[first + i] = [quality.safe_text(names[i]), reasons[i],
                                                  quality.source_json(records[i])]
                del records
                good = frame.drop(index=list(reasons)) if reasons else frame
                if len(good):
                    self.silver.write(quality.typed(good, unique=False), first + good.index.to_numpy())  # hashed there
                del frame, good
            self.raw.append({"uri": f"s3://{self.stage.settings.raw_bucket}/{obj['key']}", "records": count,
                             "sha256": digest})

    def copies(self, wanted: set[int]) -> dict[int, tuple]:
        """The records that share a key, read again from their raw objects: (key, copy shape, source
        JSON when not already quarantined) by record id. Only payloads with duplicate keys pay this."""
        found = {}
        for number in range(len(self.objects)):
            start = self.starts[number]
            end = self.starts[number + 1] if number + 1 < len(self.starts) else float("inf")
            if not any(start <= r < end for r in wanted):
                continue
            for records, position in self.records(number):
                ids = [start + position + offset for offset in range(len(records))]
                taken = [i for i, rid in enumerate(ids) if rid in wanted]
                if not taken:
                    continue
                rows = transform.flatten([records[i] for i in taken])
                for row, i in zip(rows.itertuples(index=False), taken):
                    found[ids[i]] = (getattr(row, contract.KEY), quality.copy_shape(row),
                                     None if ids[i] in self.quarantine else quality.source_json(records[i]))
        return found


def prepare(stage: StageRun) -> Prepared:
    """Read every raw object of the run (or, with backfill_date, of that date) as it streams in,
    and flatten, validate and write the clean rows to a temporary Parquet file CHUNK_ROWS records
    at a time; nothing is written to the object store here. When several objects hold the same
    country, the newest object wins and the older copies count as superseded; copies of a key
    within the winning object are settled as `quality.duplicates` does. Both are decided at the
    end from each record's key and object alone, and the rows they remove are filtered out of the
    file then (the record rules' reasons for a superseded record are dropped)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    settings = stage.settings
    backfill_date, min_records = stage.params.backfill_date, stage.params.min_records
    s3 = storage.client(settings.store)
    source_run = stage.input_run(Layer.RAW)
    objects = (run_objects(s3, settings.raw_bucket, date=backfill_date) if backfill_date
               else run_objects(s3, settings.raw_bucket, source_run))
    where = f"date {backfill_date}" if backfill_date else f"run {source_run}"
    if not objects:
        raise StageError(f"no raw objects for {where} in bucket {settings.raw_bucket!r}: "
                         f"run {registry.writer_of(Layer.RAW).name} first")
    # Bronze put in place by hand has no stage 1 record: its metadata is checked. A backfill reads
    # other runs' bronze too: checked against their metadata.
    read = _Pass(stage, s3, objects, [layout.run_of(o["key"]) == source_run for o in objects], min_records)
    silver, quarantine, raw, starts = read.silver, read.quarantine, read.raw, read.starts
    try:
        with young_gc_only():
            read.read()
    except BaseException:
        silver.discard()  # a failed stage's traceback may keep `silver` alive as long as its kernel
        raise

    # Settle keys: across objects the newest copy wins; within one object copies are compared.
    total = sum(o["records"] for o in raw)
    codes = (pc.fill_null(pc.dictionary_encode(pa.concat_arrays(read.keys)).indices, -1).to_numpy().astype("int64")
             if total else np.zeros(0, dtype="int64"))
    object_of = np.repeat(np.arange(len(raw)), [o["records"] for o in raw])
    has_key = codes >= 0
    safe_codes = np.where(has_key, codes, 0)
    newest = np.full(int(codes.max()) + 1 if total and has_key.any() else 1, -1)
    np.maximum.at(newest, codes[has_key], object_of[has_key])
    superseded = has_key & (object_of < newest[safe_codes])
    candidates = (np.concatenate(read.strings) if read.strings else np.zeros(0, dtype=bool)) & ~superseded
    copies = np.bincount(codes[candidates], minlength=len(newest))
    duplicated = np.flatnonzero(candidates & (copies[safe_codes] >= 2))
    drop = set(np.flatnonzero(superseded).tolist())
    for record in drop:
        quarantine.pop(record, None)
    summary = {}
    if len(duplicated):
        found = read.copies(set(duplicated.tolist()))
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
    return Prepared(checked, raw, read.drift.result(), int(superseded.sum()), date, backfill_date, fetched, silver)


def write(stage: StageRun, prepared: Prepared) -> list[storage.Artifact]:
    """Check the share of bad records, then write the clean table and the quarantine with reasons,
    in `silver_format` ('' for lib/formats.py's default). The clean table is uploaded from the file
    `prepare` wrote (Parquet as it is; CSV encoded a row group at a time)."""
    settings = stage.settings
    max_invalid_fraction = stage.params.max_invalid_fraction
    fmt = formats.get(stage.params.silver_format or formats.DEFAULT_SILVER)
    counts = prepared.validated.counts
    total = counts["records"]
    fraction = counts["quarantined"] / total if total else 1.0
    silver = prepared.silver
    if not os.path.exists(silver.path):
        raise StageError("these prepared rows were written (or discarded) already: run clean.prepare again")
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
    if fmt is formats.PARQUET:  # the temporary file's own format: uploaded as it is
        size, digest = silver.digest()
        with open(silver.path, "rb") as f:
            clean = storage.put_stream(s3, settings.clean_bucket, clean_key, f, size=size, digest=digest, rows=rows,
                                       inputs=inputs, content_type=fmt.content_type, metadata=meta)
    else:
        spool = storage.HashingSpool()
        try:
            if fmt.joinable:
                for part in formats.join(fmt, (fmt.encode(frame) for frame in silver.frames())):
                    spool.write(part)
            else:
                spool.write(fmt.encode(pd.concat(list(silver.frames()), ignore_index=True)))
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


