"""Stage notebooks 01-03 on real services: bad records are quarantined with reasons, too many of them
stop the run, unreadable raw objects are refused, schema drift is reported, and a backfill merges the
raw objects of one date (newest copy of a country wins)."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest

from lib import db, db_read, formats, layout, runs, storage
from tests.notebooks.helpers import (by_name, counts_shown, executed, keys_of_run, manifest, payload,
                                     read_object, read_table, renamed, snapshot, table_exists, cell_output)


def test_bad_records_are_quarantined_with_reasons_and_drift_is_reported(run_pipeline, settings, s3, pg,
                                                                         api, unique):
    """A good response with four bad records mixed in (one a second France with other values), an
    extra field on every record and one record without `flags`: the bad ones and both Frances (the
    API's order must not decide which wins) land in quarantine with their reasons, the 249 other rows
    reach PostgreSQL, and the counts and the drift are in the run record and the executed notebook."""
    table, run_id = f"t_{unique}", f"silver-{unique}"
    good = snapshot()
    first = by_name(good)
    without_name = {k: v for k, v in copy.deepcopy(first["Chile"]).items() if k != "name"}
    lots = renamed(first["Peru"], "Atlantis", population="lots")
    negative = renamed(first["Fiji"], "Lemuria", area=-5.0)
    duplicate = {**copy.deepcopy(first["France"]), "population": 1}  # a second France
    del first["Kenya"]["flags"]  # drift: a record missing a field it should have (a nullable one)
    records = list(good)
    for position, record in ((3, without_name), (120, lots), (190, negative), (len(records), duplicate)):
        records.insert(position, record)
    for record in records:
        record["startOfWeek"] = "monday"  # drift: a field nobody asked for
    bad = {records.index(r): r for r in (without_name, lots, negative, duplicate, first["France"])}
    assert records.index(first["France"]) < records.index(duplicate)
    api.payload = payload(records)

    res = run_pipeline("--run-id", run_id, "--stages", "1-3", "-p", f"table={table}", "-p", "min_records=200")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "[5 quarantined]" in res.stdout

    # The run record: every record in is either clean or quarantined.
    details = manifest(settings, run_id)["stages"]["02_clean"]["details"]
    assert details["raw_records"] == 254
    assert (details["clean_rows"], details["quarantined"], details["superseded"]) == (249, 5, 0)
    assert details["clean_rows"] + details["quarantined"] == details["raw_records"]
    assert details["invalid_fraction"] == round(5 / 254, 6)
    assert details["duplicates"] == {"France": {"copies": 2, "outcome": "different values: all quarantined"}}
    assert details["drift"] == {"unexpected_fields": {"startOfWeek": 254},
                                "missing_fields": {"name": 1, "flags": 1}}

    # The quarantine object lists exactly the four bad records, each with its reason and its source.
    quarantine_keys = [k for k in keys_of_run(s3, settings.clean_bucket, run_id) if k.startswith("quarantine/")]
    assert len(quarantine_keys) == 1 and quarantine_keys[0].endswith(f"/quarantine.{formats.DEFAULT_SILVER}")
    quarantine = read_object(s3, settings.clean_bucket, quarantine_keys[0])
    assert list(quarantine.columns) == ["record", "raw_object", "name_common", "reasons", "source"]
    assert set(quarantine["raw_object"]) == {details["raw_objects"][0]["uri"]}  # traceable to its source
    assert sorted(quarantine["record"]) == sorted(bad)
    rows = quarantine.set_index("record")
    for position, record in bad.items():
        assert json.loads(rows.at[position, "source"]) == record
    reasons = rows["reasons"].to_dict()
    names_ = rows["name_common"].to_dict()
    i = records.index
    assert reasons[i(without_name)] == "name_common is missing; name_official is missing"
    assert pd.isna(names_[i(without_name)])
    assert reasons[i(lots)] == "population must be a whole number >= 0 (got 'lots')"
    assert names_[i(lots)] == "Atlantis"
    assert reasons[i(negative)] == "area must be a number >= 0 (got -5.0)"
    for copy_ in (duplicate, first["France"]):
        assert reasons[i(copy_)] == "name_common 'France' appears 2 times with different values: every copy quarantined"

    # Silver and PostgreSQL hold exactly the 249 good countries, with their own values.
    clean_key = [k for k in keys_of_run(s3, settings.clean_bucket, run_id) if layout.is_clean(k)]
    clean = read_table(s3, settings.clean_bucket, clean_key[0])
    # Stages 1-3 only: the run's rows are in its staging copy; consumers' table is not there yet.
    staged = manifest(settings, run_id)["stages"]["03_load"]["details"]["staged_schema"]
    current = db_read.current(pg, staged, table)
    assert not db.table_exists(pg, "public", table)
    for frame in (clean, current):
        assert len(frame) == 249 and frame["name_common"].is_unique
        assert dict(zip(frame["name_common"], frame["population"])) == {
            r["name"]["common"]: r["population"] for r in good if r["name"]["common"] != "France"}
    kenya = current.set_index("name_common").loc["Kenya"]
    assert pd.isna(kenya["flag_png"]) and pd.isna(kenya["flag_svg"]) and pd.isna(kenya["flag_alt"])
    assert set(current["_run_id"]) == {run_id}

    # The executed notebook shows the counts, the quarantined records and the drift.
    notebook = executed(settings, run_id, "02_clean")
    assert counts_shown(notebook) == {"raw objects": 1, "records in": 254, "clean": 249, "quarantined": 5,
                                      "superseded": 0}
    shown = cell_output(notebook, "prepared.validated.quarantine")
    assert "Atlantis" in shown and "Lemuria" in shown and "France" in shown
    drift_shown = cell_output(notebook, "prepared.drift")
    assert "'startOfWeek': 254" in drift_shown and "'flags': 1" in drift_shown and "'name': 1" in drift_shown


def test_too_many_bad_records_fail_stage_2_and_write_nothing(run_pipeline, settings, s3, pg, api, unique):
    table, run_id = f"t_{unique}", f"toomany-{unique}"
    good = snapshot()
    bad = [renamed(good[n], f"Nowhere {n}", population="lots") for n in range(20)]
    api.payload = payload(good + bad)

    res = run_pipeline("--run-id", run_id, "--stages", "1-3", "-p", f"table={table}")
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    message = "20 of 270 records (7.4%) break the contract, more than max_invalid_fraction=5.0%"
    assert message in res.stderr
    assert "stage 02_clean FAILED" in res.stderr

    m = manifest(settings, run_id)
    assert m["status"] == "failed"
    assert m["stages"]["01_ingest"]["status"] == "succeeded"
    assert m["stages"]["02_clean"]["status"] == "failed" and message in m["stages"]["02_clean"]["error"]
    assert "03_load" not in m["stages"]
    assert keys_of_run(s3, settings.clean_bucket, run_id) == []
    assert len(keys_of_run(s3, settings.raw_bucket, run_id)) == 1  # bronze keeps what the API said
    assert not table_exists(pg, "public", table)


@pytest.mark.parametrize("body, problem", [
    (b"[]", "the API answered with an empty list: no countries"),
    (b'{"countries": []}', "the API answer is a JSON dict, not a list of countries"),
], ids=["empty-list", "not-a-list"])
def test_unusable_raw_object_fails_stage_2_and_writes_nothing(run_pipeline, settings, s3, unique, body, problem):
    run_id = f"rawbad-{unique}"
    key = f"countries/ingest_date=2026-01-01/run_id={run_id}/countries.json"
    storage.ensure_bucket(s3, settings.raw_bucket)
    storage.put_bytes(s3, settings.raw_bucket, key, body, metadata={"run-id": run_id, "stage": "test"},
                      content_type="application/json")
    runs.RunRecord.open(settings, run_id, ["01_ingest"], {}).finish("failed")  # a recorded run: it reads its own raw

    res = run_pipeline("--stages", "2", "--run-id", run_id)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"s3://{settings.raw_bucket}/{key}: {problem}; nothing was written" in res.stderr
    m = manifest(settings, run_id)
    assert m["status"] == "failed" and problem in m["stages"]["02_clean"]["error"]
    assert keys_of_run(s3, settings.clean_bucket, run_id) == []


def test_backfill_merges_the_raw_objects_of_a_date_newest_copy_wins(run_pipeline, settings, s3, api, unique):
    """Two runs ingest on the same date; a third run's stage 2 with backfill_date reads both objects."""
    date = "2031-07-15"
    first, second, backfill = f"20310715T010000Z-{unique}", f"20310715T020000Z-{unique}", f"bf-{unique}"
    res = run_pipeline("--run-id", first, "--stages", "1")
    assert res.returncode == 0, res.stderr[-3000:]

    records = snapshot()
    current = by_name(records)
    current["Chile"]["population"] += 1000
    current["Peru"]["population"] += 2000
    records.remove(current["Aruba"])
    records.append(renamed(current["Fiji"], "Atlantis"))
    api.records = records
    res = run_pipeline("--run-id", second, "--stages", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    for run_id in (first, second):
        assert [k.split("/")[1] for k in keys_of_run(s3, settings.raw_bucket, run_id)] == [f"ingest_date={date}"]

    res = run_pipeline("--run-id", backfill, "--stages", "2", "-p", f"backfill_date={date}")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]

    details = manifest(settings, backfill)["stages"]["02_clean"]["details"]
    assert details["backfill_date"] == date
    assert [o["uri"].split("/run_id=")[1].split("/")[0] for o in details["raw_objects"]] == [first, second]
    assert [o["records"] for o in details["raw_objects"]] == [250, 250]
    # 249 countries are in both objects: the first run's copies are superseded.
    assert (details["raw_records"], details["clean_rows"], details["quarantined"], details["superseded"]) == \
        (500, 251, 0, 249)
    assert details["clean_rows"] + details["quarantined"] + details["superseded"] == details["raw_records"]
    assert counts_shown(executed(settings, backfill, "02_clean")) == {
        "raw objects": 2, "records in": 500, "clean": 251, "quarantined": 0, "superseded": 249}

    keys = keys_of_run(s3, settings.clean_bucket, backfill)
    clean_key = f"countries/ingest_date={date}/run_id={backfill}/capitals_clean.{formats.DEFAULT_SILVER}"
    assert sorted(keys) == [clean_key, f"quarantine/ingest_date={date}/run_id={backfill}/quarantine.{formats.DEFAULT_SILVER}"]
    clean = read_table(s3, settings.clean_bucket, clean_key).set_index("name_common")
    original = by_name(snapshot())
    assert len(clean) == 251 and clean.index.is_unique
    assert clean.at["Chile", "population"] == original["Chile"]["population"] + 1000  # the newer copy
    assert clean.at["Peru", "population"] == original["Peru"]["population"] + 2000
    assert clean.at["Aruba", "population"] == original["Aruba"]["population"]  # only in the older object
    assert "Atlantis" in clean.index  # only in the newer object
