"""Stage 2 called directly on the real services: in chunks it settles copies as validating the whole
payload does, and refuses broken or tampered bronze."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest

from lib import formats, layout, quality, source, storage, transform
from lib.stages import context, clean


def _bronze(settings, s3, run_id: str, records: list) -> None:
    """A run whose stage 1 stored these records (any records: they need not pass its checks)."""
    stage = context.begin("01_ingest", run_id)
    storage.ensure_bucket(s3, settings.raw_bucket)
    stage.record.output(storage.put_bytes(
        s3, settings.raw_bucket, layout.raw_key(run_id), json.dumps(records).encode(), metadata=stage.meta(),
        content_type="application/json", rows=len(records)))
    stage.finish()


def _silver_rows(prepared) -> pd.DataFrame:
    return pd.concat(list(prepared.silver.frames()), ignore_index=True)


def test_chunked_clean_settles_copies_across_chunks_as_validating_the_whole_payload_does(
        settings, s3, unique, monkeypatch):
    monkeypatch.setattr(clean, "CHUNK_ROWS", 7)  # 250 records: dozens of chunks
    records = copy.deepcopy(source.parse_payload(source.snapshot_bytes()))[:60]
    records.append(copy.deepcopy(records[3]))  # an identical copy, chunks apart
    different = copy.deepcopy(records[20])
    different["population"] += 1
    records.insert(2, different)  # a differing copy, before the original
    records[40]["population"] = "lots"  # broken ...
    records.append(copy.deepcopy(records[40]))  # ... and copied
    records[10]["name"]["official"] = "a\x00b"  # unstorable
    run_id = f"20310716T010000Z-{unique}"
    _bronze(settings, s3, run_id, records)

    prepared = clean.prepare(context.begin("02_clean", run_id, min_records=1))
    whole = quality.validate(transform.flatten(records), records)
    assert prepared.validated.counts == whole.counts
    assert prepared.validated.duplicates == whole.duplicates
    pd.testing.assert_frame_equal(prepared.validated.quarantine.drop(columns="raw_object"), whole.quarantine)
    assert set(prepared.validated.quarantine["raw_object"]) == {f"s3://{settings.raw_bucket}/{layout.raw_key(run_id)}"}
    rows = _silver_rows(prepared)
    pd.testing.assert_frame_equal(rows, whole.clean.astype({"_row_hash": object}))  # source order, same hashes
    assert prepared.silver.result == quality.fingerprint(whole.clean)
    assert prepared.superseded == 0 and prepared.raw_records == len(records)
    pd.testing.assert_frame_equal(prepared.validated.sample, rows.head(len(prepared.validated.sample)))


def test_chunked_backfill_keeps_the_newest_objects_copy_and_counts_the_older_ones(settings, s3, unique, monkeypatch):
    monkeypatch.setattr(clean, "CHUNK_ROWS", 9)
    records = copy.deepcopy(source.parse_payload(source.snapshot_bytes()))[:30]
    older = copy.deepcopy(records)
    older[5]["population"] = "lots"  # broken in the older object only: superseded, not quarantined
    older.append({**copy.deepcopy(records[0]), "name": {"common": f"Only old {unique}", "official": "Old"}})
    newer = copy.deepcopy(records[:20])
    newer[0]["area"] += 1
    day = "20310717"
    _bronze(settings, s3, f"{day}T010000Z-{unique}", older)
    _bronze(settings, s3, f"{day}T020000Z-{unique}", newer)

    prepared = clean.prepare(context.begin("02_clean", f"{day}T020000Z-{unique}", backfill_date="2031-07-17",
                                           min_records=1))
    assert prepared.superseded == 20
    assert prepared.validated.counts == {"clean": 31, "quarantined": 0, "records": 31}
    rows = _silver_rows(prepared).set_index("name_common")
    assert rows.at[records[0]["name"]["common"], "area"] == records[0]["area"] + 1
    assert f"Only old {unique}" in rows.index and rows.index.is_unique
    assert prepared.silver.result == quality.fingerprint(rows.reset_index())
    assert [o["records"] for o in prepared.raw_objects] == [31, 20]


def test_a_chunked_clean_refuses_a_broken_raw_object_and_a_tampered_one_by_its_checksum(settings, s3, unique):
    run_id = f"20310718T010000Z-{unique}"
    _bronze(settings, s3, run_id, [{"name": {"common": "x"}}] * 3)
    key = layout.raw_key(run_id)
    data, meta = storage.get_bytes(s3, settings.raw_bucket, key)
    with pytest.raises(context.StageError, match="fewer than min_records=5; nothing was written"):
        clean.prepare(context.begin("02_clean", run_id, min_records=5))
    s3.put_object(Bucket=settings.raw_bucket, Key=key, Body=data[:-5], Metadata=meta)  # cut, metadata kept
    with pytest.raises(context.StageError, match="checksum mismatch"):
        clean.prepare(context.begin("02_clean", run_id, min_records=1))


@pytest.mark.parametrize("silver_format", ["csv", "parquet"])
def test_silver_written_from_chunks_reads_back_whole_with_the_recorded_fingerprint(
        settings, s3, unique, monkeypatch, silver_format):
    monkeypatch.setattr(clean, "CHUNK_ROWS", 40)  # several row groups, one CSV header
    records = source.parse_payload(source.snapshot_bytes())
    run_id = f"20310719T010000Z-{unique}"
    _bronze(settings, s3, run_id, records)
    stage = context.begin("02_clean", run_id, silver_format=silver_format)
    written, quarantine = clean.write(stage, clean.prepare(stage))
    data, meta = storage.get_bytes(s3, written.bucket, written.key)
    assert meta["sha256"] == storage.sha256(data) == written.sha256 and written.size == len(data)
    back = formats.of_key(written.key).decode(data)
    assert len(back) == written.rows == 250 and back["name_common"].is_unique
    details = stage.record.data["details"]
    assert quality.fingerprint(back)["fingerprint"] == details["clean_fingerprint"]
    assert quality.fingerprint(back) == quality.fingerprint(quality.validate(transform.flatten(records), records).clean)
    assert quarantine.rows == 0 and details["raw_records"] == 250 and details["clean_rows"] == 250
