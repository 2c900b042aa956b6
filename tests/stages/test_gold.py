"""Stage 5 called directly on the real services: the checksum guard, reconciliation failures, and the
change report's notion of "the previous run"."""

from __future__ import annotations

import json

import pytest

from lib import formats, layout, publish, reconciliation, runs, source, storage
from lib.stages import context, gold
from tests.record_helpers import alter_stage
from tests.stages.helpers import gold_keys, run_stages


def test_gold_refuses_an_export_whose_checksum_does_not_match(settings, s3, unique):
    run_id, table = f"st-sum-{unique}", f"t_{unique}"
    out = run_stages(run_id, table, upto=4)
    export = out["export"][0]
    cloud = storage.cloud_client(settings.cloud)
    data, meta = storage.get_bytes(cloud, export.bucket, export.key)
    tampered = data.replace(b"Kabul", b"Kabol", 1)
    assert tampered != data
    cloud.put_object(Bucket=export.bucket, Key=export.key, Body=tampered, Metadata=meta)  # metadata kept

    with pytest.raises(context.StageError, match="checksum mismatch.*nothing was written by 05_gold"):
        gold.build(context.begin("05_gold", run_id, table=table))
    assert gold_keys(s3, settings, run_id) == []


def test_gold_reports_a_changed_export_as_changed_even_when_it_no_longer_reads_as_csv(settings, s3, unique):
    """The export is converted as it downloads, but a failure to read it is raised only after its
    sha256 is proven: an export cut short says checksum mismatch, not a CSV error."""
    run_id, table = f"st-cut-{unique}", f"t_{unique}"
    export = run_stages(run_id, table, upto=4)["export"][0]
    cloud = storage.cloud_client(settings.cloud)
    data, meta = storage.get_bytes(cloud, export.bucket, export.key)
    cloud.put_object(Bucket=export.bucket, Key=export.key, Body=data[:data.index(b"\n") - 3], Metadata=meta)

    with pytest.raises(context.StageError, match="checksum mismatch.*nothing was written by 05_gold"):
        gold.build(context.begin("05_gold", run_id, table=table))
    assert gold_keys(s3, settings, run_id) == []


def test_a_reconciliation_mismatch_names_the_hop_and_leaves_latest_gold_alone(settings, s3, unique):
    table = f"t_{unique}"
    good, bad = f"st-good-{unique}", f"st-bad-{unique}"
    run_stages(good, table)
    run_stages(bad, table, upto=4)
    # Make the record of the load disagree with silver, as a lost or altered row would.
    alter_stage(settings, bad, "03_load", lambda record: record["details"].update(batch_fingerprint="0" * 64))

    stage = context.begin("05_gold", bad, table=table)
    golden = gold.build(stage)
    with pytest.raises(reconciliation.ReconciliationError, match="'clean \\+ quarantine \\(silver\\) → PostgreSQL rows of this batch'"):
        gold.reconcile(stage, golden)
    stage.finish()
    with pytest.raises(publish.PublishError, match="did not reconcile: only a proven run can be published"):
        publish.run(settings, bad)
    latest = storage.head(s3, settings.gold_bucket, layout.latest(layout.gold_table_key(table, good, formats.DEFAULT_GOLD)))
    assert latest["metadata"]["run-id"] == good  # latest still points at the last good run


def test_running_gold_again_compares_with_the_previous_run_not_itself(settings, s3, api, unique):
    table = f"t_{unique}"
    first, second = f"st-a-{unique}", f"st-b-{unique}"
    run_stages(first, table)
    api.records[0]["population"] += 1  # one change between the runs
    changed = api.records[0]["name"]["common"]
    run_stages(second, table)

    stage = context.begin("05_gold", second, table=table)
    again = gold.build(stage)
    gold.reconcile(stage, again)
    stage.finish()
    publish.run(settings, second)
    assert again.changes["previous_run_id"] == first
    assert list(again.changes["changed"]) == [changed]
    assert set(again.changes["changed"][changed]) == {"population"}


def test_after_a_gold_format_change_the_next_run_compares_with_the_run_before_it(settings, s3, api, unique):
    table = f"t_{unique}"
    other = next(f for f in formats.FORMATS if f != formats.DEFAULT_GOLD)
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
    assert latest == [f"countries/latest/{table}.{formats.get(formats.DEFAULT_GOLD).extension}"]


def test_a_first_gold_table_keeps_a_sample_of_its_added_keys_and_writes_them_all(settings, s3, unique, monkeypatch):
    """A first table adds every key: the report in memory keeps the first CHANGES_SAMPLE of them and
    the counts; changes.json (streamed) has every key, in order, as json.dumps would write it."""
    monkeypatch.setattr(gold, "CHANGES_SAMPLE", 5)
    run_id, table = f"st-first-{unique}", f"t_{unique}"
    golden = run_stages(run_id, table)["gold"]
    data, meta = storage.get_bytes(s3, settings.gold_bucket, layout.changes_key(run_id))
    report = json.loads(data)
    keys = sorted(formats.get(formats.DEFAULT_GOLD).decode(storage.get_bytes(
        s3, settings.gold_bucket, layout.gold_table_key(table, run_id, formats.get(formats.DEFAULT_GOLD).extension))[0])["name_common"])
    assert report == {"previous_run_id": None, "added": keys, "removed": [], "changed": {}, "held": {}}
    assert data == json.dumps(report, indent=2, ensure_ascii=False).encode()
    assert meta["sha256"] == storage.sha256(data) and meta["rows"] == str(len(keys))
    assert golden.changes["added"] == keys[:5] and golden.changes["removed"] == []
    assert golden.changes["counts"] == {"added": len(keys), "removed": 0, "changed": 0, "held": 0}
    assert runs.read_stage(settings, run_id, "05_gold")["details"]["changes"] == golden.changes["counts"]


def test_a_population_at_the_bigint_limit_gives_exact_aggregates_that_reconcile(settings, s3, api, unique):
    records = json.loads(source.snapshot_bytes())
    giant = next(r for r in records if r["name"]["common"] == "Tuvalu")
    giant["population"] = 2**63 - 1  # a valid bigint: the contract accepts it, a sum of int64 would wrap
    api.records = records
    golden = run_stages(f"st-big-{unique}", f"big_{unique}")["gold"]
    oceania = golden.aggregates["by_region"].set_index("region").at["Oceania", "population"]
    assert int(oceania) == sum(r["population"] for r in records if r["region"] == "Oceania") > 2**63
    assert set(golden.reconciliation["status"]) <= {"ok", "-"}
    assert "gold aggregates" in set(golden.reconciliation["hop"])


def test_a_quarantined_country_is_held_current_and_listed_as_held(settings, s3, api, pg, unique):
    table = f"held_{unique}"
    run_stages(f"st-held-a-{unique}", table)
    records = json.loads(source.snapshot_bytes())
    next(r for r in records if r["name"]["common"] == "France")["capital"] = 5  # breaks the contract
    api.records = records
    out = run_stages(f"st-held-b-{unique}", table)
    assert out["load"].result["held"] == 1 and out["load"].result["retired"] == 0
    with pg.cursor() as cur:
        cur.execute(f'SELECT _run_id FROM "{table}" WHERE name_common = %s', ("France",))
        assert cur.fetchone() == (f"st-held-a-{unique}",)  # still current, as the earlier run left it
    report = out["gold"].changes
    assert report["removed"] == [] and "capital must be a list of strings" in report["held"]["France"]
    assert report["counts"]["held"] == 1
