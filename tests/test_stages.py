"""lib.stages called directly (no papermill) on the real services: idempotent bronze, the gold
checksum guard, reconciliation failures, and the change report's notion of "the previous run"."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest

from lib import formats, gold, layout, quality, runs, source, stages, storage, transform


def run_stages(run_id: str, table: str, upto: int = 5, gold_format: str = "", **ingest_options) -> dict:
    """Run stages 1..upto of one run the way the notebooks do; returns what each returned."""
    out = {}
    stage = stages.begin("01_ingest", run_id)
    out["ingest"] = stages.ingest(stage, min_records=200, **ingest_options)
    stage.finish()
    stage = stages.begin("02_clean", run_id)
    stages.write_clean(stage, stages.prepare_clean(stage, min_records=200))
    stage.finish()
    stage = stages.begin("03_load", run_id)
    out["load"] = stages.load(stage, table=table)
    stage.finish()
    stage = stages.begin("04_export", run_id)
    out["export"] = stages.export(stage, table=table)
    stage.finish()
    if upto >= 5:
        stage = stages.begin("05_gold", run_id)
        out["gold"] = stages.build_gold(stage, table=table, gold_format=gold_format)
        stages.reconcile(stage, out["gold"])
        stages.publish(stage, out["gold"])
        stage.finish()
    return out


def gold_keys(s3, settings, run_id: str) -> list[str]:
    storage.ensure_bucket(s3, settings.gold_bucket)  # a test run alone may not have made it yet
    return [o["key"] for o in storage.list_objects(s3, settings.gold_bucket) if f"/run_id={run_id}/" in o["key"]]


def test_ingest_date_comes_from_a_generated_run_id():
    assert layout.ingest_date("20310715T101500Z-abc123") == "2031-07-15"
    assert len(layout.ingest_date("nightly-42")) == 10  # today, for a run id without a date


def test_running_ingest_again_for_a_run_reuses_its_bronze(settings, s3, api, unique):
    run_id = f"st-reuse-{unique}"
    first = stages.ingest(stages.begin("01_ingest", run_id), min_records=200)
    again = stages.ingest(stages.begin("01_ingest", run_id), min_records=200)
    assert not first.reused and again.reused
    assert again.artifact.sha256 == first.artifact.sha256 and again.artifact.key == first.artifact.key
    assert len(api.requests) == 1  # the API was asked once
    assert len(stages.run_objects(s3, settings.raw_bucket, run_id)) == 1


def test_gold_refuses_an_export_whose_checksum_does_not_match(settings, s3, unique):
    run_id, table = f"st-sum-{unique}", f"t_{unique}"
    out = run_stages(run_id, table, upto=4)
    export = out["export"][0]
    cloud = storage.cloud_client(settings.cloud)
    data, meta = storage.get_bytes(cloud, export.bucket, export.key)
    tampered = data.replace(b"Kabul", b"Kabol", 1)
    assert tampered != data
    cloud.put_object(Bucket=export.bucket, Key=export.key, Body=tampered, Metadata=meta)  # metadata kept

    with pytest.raises(stages.StageError, match="checksum mismatch.*nothing was written by 05_gold"):
        stages.build_gold(stages.begin("05_gold", run_id), table=table)
    assert gold_keys(s3, settings, run_id) == []


def test_gold_reports_a_changed_export_as_changed_even_when_it_no_longer_reads_as_csv(settings, s3, unique):
    """The export is converted as it downloads, but a failure to read it is raised only after its
    sha256 is proven: an export cut short says checksum mismatch, not a CSV error."""
    run_id, table = f"st-cut-{unique}", f"t_{unique}"
    export = run_stages(run_id, table, upto=4)["export"][0]
    cloud = storage.cloud_client(settings.cloud)
    data, meta = storage.get_bytes(cloud, export.bucket, export.key)
    cloud.put_object(Bucket=export.bucket, Key=export.key, Body=data[:data.index(b"\n") - 3], Metadata=meta)

    with pytest.raises(stages.StageError, match="checksum mismatch.*nothing was written by 05_gold"):
        stages.build_gold(stages.begin("05_gold", run_id), table=table)
    assert gold_keys(s3, settings, run_id) == []


def test_a_reconciliation_mismatch_names_the_hop_and_leaves_latest_gold_alone(settings, s3, unique):
    table = f"t_{unique}"
    good, bad = f"st-good-{unique}", f"st-bad-{unique}"
    run_stages(good, table)
    run_stages(bad, table, upto=4)
    # Make the record of the load disagree with silver, as a lost or altered row would.
    path = runs.stage_path(settings, bad, "03_load")
    record = runs.read_json(path)
    record["details"]["batch_fingerprint"] = "0" * 64
    runs.write_json(path, record)

    stage = stages.begin("05_gold", bad)
    golden = stages.build_gold(stage, table=table)
    with pytest.raises(gold.ReconciliationError, match="'clean \\+ quarantine \\(silver\\) → PostgreSQL rows of this batch'"):
        stages.reconcile(stage, golden)
    with pytest.raises(stages.StageError, match="has not reconciled: nothing was published"):
        stages.publish(stage, golden)
    latest = storage.head(s3, settings.gold_bucket, layout.latest(layout.gold_table_key(table, good, formats.GOLD)))
    assert latest["metadata"]["run-id"] == good  # latest still points at the last good run


def test_running_gold_again_compares_with_the_previous_run_not_itself(settings, s3, api, unique):
    table = f"t_{unique}"
    first, second = f"st-a-{unique}", f"st-b-{unique}"
    run_stages(first, table)
    api.records[0]["population"] += 1  # one change between the runs
    changed = api.records[0]["name"]["common"]
    run_stages(second, table)

    stage = stages.begin("05_gold", second)
    again = stages.build_gold(stage, table=table)
    stages.reconcile(stage, again)
    stages.publish(stage, again)
    assert again.changes["previous_run_id"] == first
    assert list(again.changes["changed"]) == [changed]
    assert set(again.changes["changed"][changed]) == {"population"}


def test_after_a_gold_format_change_the_next_run_compares_with_the_run_before_it(settings, s3, api, unique):
    table = f"t_{unique}"
    other = next(f for f in formats.FORMATS if f != formats.GOLD)
    first, second, third = (f"st-fmt{n}-{unique}" for n in (1, 2, 3))
    run_stages(first, table, gold_format=other)
    run_stages(second, table)  # the default format from now on
    api.records[0]["area"] += 1
    out = run_stages(third, table)
    assert out["gold"].changes["previous_run_id"] == second
    assert list(out["gold"].changes["changed"]) == [api.records[0]["name"]["common"]]
    # Only the current format's `latest` is left.
    latest = [o["key"] for o in storage.list_objects(s3, settings.gold_bucket, "countries/latest/")
              if o["key"].startswith(f"countries/latest/{table}.")]
    assert latest == [f"countries/latest/{table}.{formats.get(formats.GOLD).extension}"]


# --- stage 2 in chunks: the same outcome as validating the whole payload at once ------------------------

def _bronze(settings, s3, run_id: str, records: list) -> None:
    """A run whose stage 1 stored these records (any records: they need not pass its checks)."""
    stage = stages.begin("01_ingest", run_id)
    storage.ensure_bucket(s3, settings.raw_bucket)
    stage.record.output(storage.put_bytes(
        s3, settings.raw_bucket, layout.raw_key(run_id), json.dumps(records).encode(), metadata=stage.meta(),
        content_type="application/json", rows=len(records)))
    stage.finish()


def _silver_rows(prepared) -> pd.DataFrame:
    return pd.concat(list(prepared.silver.frames()), ignore_index=True)


def test_chunked_clean_settles_copies_across_chunks_as_validating_the_whole_payload_does(
        settings, s3, unique, monkeypatch):
    monkeypatch.setattr(stages, "CHUNK_ROWS", 7)  # 250 records: dozens of chunks
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

    prepared = stages.prepare_clean(stages.begin("02_clean", run_id))
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
    monkeypatch.setattr(stages, "CHUNK_ROWS", 9)
    records = copy.deepcopy(source.parse_payload(source.snapshot_bytes()))[:30]
    older = copy.deepcopy(records)
    older[5]["population"] = "lots"  # broken in the older object only: superseded, not quarantined
    older.append({**copy.deepcopy(records[0]), "name": {"common": f"Only old {unique}", "official": "Old"}})
    newer = copy.deepcopy(records[:20])
    newer[0]["area"] += 1
    day = "20310717"
    _bronze(settings, s3, f"{day}T010000Z-{unique}", older)
    _bronze(settings, s3, f"{day}T020000Z-{unique}", newer)

    prepared = stages.prepare_clean(stages.begin("02_clean", f"{day}T020000Z-{unique}"), backfill_date="2031-07-17")
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
    with pytest.raises(stages.StageError, match="fewer than min_records=5; nothing was written"):
        stages.prepare_clean(stages.begin("02_clean", run_id), min_records=5)
    s3.put_object(Bucket=settings.raw_bucket, Key=key, Body=data[:-5], Metadata=meta)  # cut, metadata kept
    with pytest.raises(stages.StageError, match="checksum mismatch"):
        stages.prepare_clean(stages.begin("02_clean", run_id))


@pytest.mark.parametrize("silver_format", ["csv", "parquet"])
def test_silver_written_from_chunks_reads_back_whole_with_the_recorded_fingerprint(
        settings, s3, unique, monkeypatch, silver_format):
    monkeypatch.setattr(stages, "CHUNK_ROWS", 40)  # several row groups, one CSV header
    records = source.parse_payload(source.snapshot_bytes())
    run_id = f"20310719T010000Z-{unique}"
    _bronze(settings, s3, run_id, records)
    stage = stages.begin("02_clean", run_id)
    clean, quarantine = stages.write_clean(stage, stages.prepare_clean(stage), silver_format=silver_format)
    data, meta = storage.get_bytes(s3, clean.bucket, clean.key)
    assert meta["sha256"] == storage.sha256(data) == clean.sha256 and clean.size == len(data)
    back = formats.of_key(clean.key).decode(data)
    assert len(back) == clean.rows == 250 and back["name_common"].is_unique
    details = stage.record.data["details"]
    assert quality.fingerprint(back)["fingerprint"] == details["clean_fingerprint"]
    assert quality.fingerprint(back) == quality.fingerprint(quality.validate(transform.flatten(records), records).clean)
    assert quarantine.rows == 0 and details["raw_records"] == 250 and details["clean_rows"] == 250


def test_a_first_gold_table_keeps_a_sample_of_its_added_keys_and_writes_them_all(settings, s3, unique, monkeypatch):
    """A first table adds every key: the report in memory keeps the first CHANGES_SAMPLE of them and
    the counts; changes.json (streamed) has every key, in order, as json.dumps would write it."""
    monkeypatch.setattr(stages, "CHANGES_SAMPLE", 5)
    run_id, table = f"st-first-{unique}", f"t_{unique}"
    golden = run_stages(run_id, table)["gold"]
    data, meta = storage.get_bytes(s3, settings.gold_bucket, layout.changes_key(run_id))
    report = json.loads(data)
    keys = sorted(formats.get(formats.GOLD).decode(storage.get_bytes(
        s3, settings.gold_bucket, layout.gold_table_key(table, run_id, formats.get(formats.GOLD).extension))[0])["name_common"])
    assert report == {"previous_run_id": None, "added": keys, "removed": [], "changed": {}}
    assert data == json.dumps(report, indent=2, ensure_ascii=False).encode()
    assert meta["sha256"] == storage.sha256(data) and meta["rows"] == str(len(keys))
    assert golden.changes["added"] == keys[:5] and golden.changes["removed"] == []
    assert golden.changes["counts"] == {"added": len(keys), "removed": 0, "changed": 0}
    assert runs.read_stage(settings, run_id, "05_gold")["details"]["changes"] == golden.changes["counts"]
