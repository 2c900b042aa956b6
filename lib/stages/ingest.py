"""Stage 1: the REST Countries API → the raw (bronze) bucket, bytes unchanged."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from lib import layout, params, quality, redact, source, storage
from lib.stages.context import SAMPLE_RECORDS, StageRun, run_objects, young_gc_only

log = logging.getLogger(__name__)


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


def run(stage: StageRun) -> Ingested:
    """API → raw bucket, bytes unchanged (lib/layout.py `raw_key`). The answer is spooled to a
    temporary file as it arrives and checked record by record before anything is written, then
    uploaded in parts. A run's bronze is written once: running the stage again for the same run
    reuses it. The request uses the URL as configured; the record, the object's metadata and the
    lineage name it with its credentials masked (lib/redact.py)."""
    settings, p = stage.settings, stage.params
    url = source.check_url(p.api_url or settings.api_url)
    shown = redact.url(url)
    fallback = (settings.snapshot_fallback if p.snapshot_fallback == "auto"
                else params.boolean(p.snapshot_fallback, "snapshot_fallback"))
    min_records = p.min_records
    s3 = storage.client(settings.store)
    storage.ensure_bucket(s3, settings.raw_bucket)
    existing = run_objects(s3, settings.raw_bucket, stage.run_id)
    if existing:
        key = existing[-1]["key"]
        body, meta = storage.open_object(s3, settings.raw_bucket, key)
        try:
            with young_gc_only():
                scan = _Scan(min_records).read(body)
        finally:
            body.close()
        artifact = storage.Artifact(settings.raw_bucket, key, scan.reader.size, scan.hash.hexdigest(),
                                    scan.reader.items, [redact.url(meta.get("source-url", shown))])
        log.info("run %s already has bronze at %s: reusing it", stage.run_id, artifact.uri)
        result = Ingested(meta.get("source", "api"), scan.reader.items, scan.sample, scan.drift.result(),
                          artifact, reused=True)
    else:
        with young_gc_only():  # checked as it arrives: raises before anything is written
            fetched = source.fetch_or_snapshot(
                url, fallback=fallback, consume=lambda: _Scan(min_records, hashing=False),
                connect_timeout=p.connect_timeout, read_timeout=p.read_timeout, max_attempts=p.max_attempts,
                max_total_seconds=p.max_total_seconds)
        scan = fetched.consumer
        try:
            origin_ref = shown if fetched.origin == "api" else f"bundled snapshot lib/data/{source.SNAPSHOT}"
            artifact = storage.put_stream(
                s3, settings.raw_bucket, layout.raw_key(stage.run_id), fetched.rewound(), size=fetched.size,
                digest=fetched.sha256, rows=scan.reader.items, inputs=[origin_ref],
                metadata=stage.meta(source=fetched.origin, **{"source-url": shown}), content_type="application/json")
        finally:
            fetched.close()
        result = Ingested(fetched.origin, scan.reader.items, scan.sample, scan.drift.result(), artifact,
                          fetched.attempts)
        stage.record.update(fallback_reason=fetched.fallback_reason)
    records = result.records
    stage.record.output(result.artifact)
    stage.record.update(rows_in=records, rows_out=records, origin=result.origin,
                        records=records, response_sha256=result.artifact.sha256,
                        attempts=result.attempts, reused=result.reused, url=shown)
    return result


