"""Altering a run's record where it lives, as a fault or a forger would: the copy in `outputs/` and
the object in the records bucket (lib/record_store.py), which the pipeline never rewrites."""

from __future__ import annotations

from lib import record_store, runs, storage


def alter_stage(settings, run_id: str, stage: str, change) -> dict:
    """Apply `change(record)` to the current record of `stage`, here and in the store; returns it."""
    path = runs.stage_path(settings, run_id, stage)
    record = runs.read_json(path)
    change(record)
    runs.write_json(path, record)
    n = len(runs.attempt_paths(settings, run_id, stage)) + 1
    key = record_store.stage_key(run_id, stage, n)
    s3 = storage.client(settings.store)
    assert storage.head(s3, settings.records_bucket, key) is not None, f"{key} is not stored"
    s3.put_object(Bucket=settings.records_bucket, Key=key, Body=path.read_bytes())  # overwritten, no If-None-Match
    return record
