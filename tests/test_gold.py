"""lib.gold: aggregates, the change report between runs, and reconciliation across hops."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from lib import formats, gold, quality, source, transform
from lib.gold import ReconciliationError


@pytest.fixture(scope="module")
def clean():
    records = source.parse_payload(source.snapshot_bytes())
    return quality.validate(transform.flatten(records), records).clean


def test_region_aggregates_add_up_to_the_whole_table(clean):
    agg = gold.by_region(clean)
    assert list(agg.columns) == ["region", "countries", "population", "area_km2", "density_per_km2"]
    assert set(agg["region"]) == set(clean["region"])
    assert agg["countries"].sum() == 250
    assert agg["population"].sum() == clean["population"].sum()
    assert agg["area_km2"].sum() == pytest.approx(clean["area"].sum())
    assert list(agg["population"]) == sorted(agg["population"], reverse=True)
    europe = agg.set_index("region").loc["Europe"]
    assert europe["density_per_km2"] == round(europe["population"] / europe["area_km2"], 2)


def test_subregion_aggregates_name_a_missing_subregion(clean):
    agg = gold.by_subregion(clean)
    assert list(agg.columns[:2]) == ["region", "subregion"]
    assert agg["countries"].sum() == 250
    none = agg[agg["subregion"] == "(none)"]
    assert none["countries"].sum() == clean["subregion"].isna().sum() == 5


def test_density_is_empty_where_the_area_is_zero(clean):
    frame = clean.head(2).copy()
    frame["region"] = ["Asia", "Europe"]
    frame.loc[frame.index[0], "area"] = 0.0
    agg = gold.by_region(frame).set_index("region")
    assert math.isnan(agg.at["Asia", "density_per_km2"])
    assert not math.isnan(agg.at["Europe", "density_per_km2"])


def test_area_sums_are_exact(clean):
    europe = clean[clean["region"] == "Europe"]
    agg = gold.by_region(clean).set_index("region")
    assert agg.at["Europe", "area_km2"] == math.fsum(europe["area"])
    assert repr(float(agg.at["Europe", "area_km2"])) == "23129737.51"


def test_every_registered_aggregate_is_a_frame_with_countries_adding_up(clean):
    assert {"by_region", "by_subregion"} <= set(gold.AGGREGATES)
    for name, fn in gold.AGGREGATES.items():
        assert fn(clean)["countries"].sum() == 250, name


def test_first_gold_table_reports_every_country_as_added(clean):
    report = gold.changes(None, clean, None)
    assert report["previous_run_id"] is None
    assert report["added"] == sorted(clean["name_common"]) and len(report["added"]) == 250
    assert report["removed"] == [] and report["changed"] == {}


def test_changes_lists_added_removed_and_changed_fields_with_old_and_new(clean):
    previous = clean.head(5).reset_index(drop=True)
    current = pd.concat([previous.iloc[1:], clean.iloc[[10]]], ignore_index=True).copy(deep=True)
    current.loc[0, "population"] = int(previous.loc[1, "population"]) + 1
    current.at[1, "capital"] = ["New Capital"]
    report = gold.changes(previous, current, "run-1")
    assert report["previous_run_id"] == "run-1"
    assert report["added"] == [clean.iloc[10]["name_common"]]
    assert report["removed"] == [previous.loc[0, "name_common"]]
    assert report["changed"] == {
        previous.loc[1, "name_common"]: {"population": [int(previous.loc[1, "population"]),
                                                        int(previous.loc[1, "population"]) + 1]},
        previous.loc[2, "name_common"]: {"capital": [list(previous.loc[2, "capital"]), ["New Capital"]]},
    }
    table = gold.changes_table(report)
    assert sorted(table["change"]) == ["added", "changed", "changed", "removed"]
    first = gold.changes_table(report, rows=2)  # a preview: the first rows only, in the same order
    assert first.to_dict(orient="records") == table.head(2).to_dict(orient="records")
    assert gold.changes_table(report, rows=0).columns.tolist() == table.columns.tolist()


def test_nulls_on_both_sides_are_not_a_change(clean):
    previous = clean[clean["subregion"].isna()].reset_index(drop=True)
    current = previous.copy()
    current["subregion"] = float("nan")  # a null read back another way
    assert gold.changes(previous, current, "r")["changed"] == {}


def test_an_unchanged_table_after_a_csv_round_trip_has_no_changes(clean):
    back = formats.csv_decode(formats.csv_encode(clean))
    report = gold.changes(clean, back, "r")
    assert report["added"] == report["removed"] == [] and report["changed"] == {}


@pytest.mark.parametrize("encode", ["parquet", "csv"])
def test_changes_between_parquet_tables_is_the_report_changes_gives(clean, encode):
    """The column-wise comparison of two tables given as bytes says exactly what `changes` says of
    the same tables as frames: added, removed, each changed field with old and new, in key order."""
    import json

    previous = clean.head(60).reset_index(drop=True)
    current = pd.concat([previous.iloc[2:], clean.iloc[[100, 101]]], ignore_index=True).copy(deep=True)
    current.loc[0, "population"] += 1
    current.at[1, "capital"] = ["New Capital", "Second"]
    current.loc[2, "subregion"] = None
    current.loc[3, "area"] = 1.5
    current.loc[4, "flag_alt"] = "changed"
    current.at[5, "timezones"] = list(current.at[5, "timezones"]) + ["UTC+14:00"]
    current.loc[5, "region"] = "Oceania"
    current = current.sample(frac=1, random_state=3).reset_index(drop=True)  # row order does not matter

    def as_bytes(frame):
        data = formats.parquet_encode(frame) if encode == "parquet" else formats.csv_encode(frame)
        return data if encode == "parquet" else formats.csv_to_parquet(data)[0]

    for before, run in ((None, None), (previous, "run-1"), (current, "run-2")):
        want = gold.changes(before, current, run)
        got = gold.changes_between(None if before is None else as_bytes(before), as_bytes(current), run)
        assert json.dumps(got, default=str) == json.dumps(want, default=str)
    assert len(gold.changes_between(as_bytes(previous), as_bytes(current), "r")["changed"]) == 6


@pytest.mark.parametrize("chunk", [1, 2, 10_000])
def test_write_changes_writes_the_text_json_dumps_gives_piece_by_piece(clean, chunk):
    """changes.json is streamed: the same bytes as json.dumps(report, indent=2), whether the added and
    removed keys are lists or Arrow arrays, however many keys are encoded at a time."""
    import io
    import json

    import pyarrow as pa

    odd = ['q", ', 'back\\slash', "é ü 日本", "new\nline", 'a"b']
    reports = [
        {"previous_run_id": None, "added": sorted(clean["name_common"].tolist() + odd), "removed": [], "changed": {}},
        {"previous_run_id": "run-1", "added": [], "removed": ["Xland"],
         "changed": {"A": {"capital": [["x"], ["y", "z"]], "area": [1.5, None]}, 'B"': {"population": [1, 2]}}},
        {"previous_run_id": "run-2", "added": [], "removed": [], "changed": {}},
    ]
    for report in reports:
        want = json.dumps(report, indent=2, ensure_ascii=False, default=str).encode()
        arrow = {**report, "added": pa.array(report["added"], pa.string()),
                 "removed": pa.array(report["removed"], pa.string())}
        for given in (report, arrow):
            sink = io.BytesIO()
            gold.write_changes(given, sink, chunk=chunk)
            assert sink.getvalue() == want


def test_changes_arrow_keeps_the_added_and_removed_keys_in_arrow_in_order(clean):
    current = formats.parquet_encode(clean.iloc[::-1].reset_index(drop=True))
    report = gold.changes_arrow(None, current, None)
    assert report["added"].to_pylist() == sorted(clean["name_common"]) and len(report["removed"]) == 0
    previous = formats.parquet_encode(clean.head(100))
    report = gold.changes_arrow(previous, formats.parquet_encode(clean.iloc[50:]), "r")
    assert report["added"].to_pylist() == sorted(clean["name_common"].iloc[100:])
    assert report["removed"].to_pylist() == sorted(clean["name_common"].iloc[:50]) and report["changed"] == {}


# --- reconcile -------------------------------------------------------------------------------------

def stage_records(rows=250, fp="f" * 64, sha="s" * 64, mode="upsert", gold_sha="e" * 64, gold_rows=248):
    """Details of each stage's record as a run that reconciles leaves them."""
    return {
        "01_ingest": {"records": rows, "response_sha256": sha},
        "02_clean": {"raw_records": rows, "raw_sha256": sha, "clean_rows": rows - 2, "quarantined": 2,
                     "silver_records": rows, "silver_breakdown": f"{rows - 2} + 2", "clean_fingerprint": fp},
        "03_load": {"batch_rows": rows - 2, "batch_fingerprint": fp, "current_rows": rows - 2,
                    "current_fingerprint": fp, "mode": mode,
                    "unreconciled": {"PostgreSQL rows of this batch": "append"} if mode == "append" else {}},
        "04_export": {"rows": rows - 2, "fingerprint": fp, "sha256": "e" * 64},
        "05_gold": {"gold_rows": gold_rows, "gold_fingerprint": fp, "gold_sha256": gold_sha},
    }


def test_reconcile_of_agreeing_hops_is_all_ok():
    table = gold.reconcile(stage_records())
    assert list(table["hop"]) == ["API response", "raw (bronze)", "clean + quarantine (silver)",
                                  "PostgreSQL rows of this batch", "PostgreSQL current table", "cloud export",
                                  "gold"]
    assert "MISMATCH" not in set(table["status"])
    assert list(table["status"]).count("ok") == 5
    assert table.loc[table["hop"] == "clean + quarantine (silver)", "records"].item() == "248 + 2"


def test_reconcile_names_the_first_hop_that_disagrees():
    details = stage_records(gold_rows=247)
    details["04_export"]["rows"] = 247
    with pytest.raises(ReconciliationError, match="'PostgreSQL current table → cloud export'"):
        gold.reconcile(details)


def test_reconcile_catches_a_changed_gold_object():
    with pytest.raises(ReconciliationError, match="cloud export → gold"):
        gold.reconcile(stage_records(gold_sha="x" * 64))


def test_reconcile_catches_records_lost_between_bronze_and_silver():
    details = stage_records()
    details["02_clean"]["silver_records"] = 249
    with pytest.raises(ReconciliationError, match="raw \\(bronze\\) → clean \\+ quarantine"):
        gold.reconcile(details)


def test_a_hop_the_stage_exempts_is_shown_as_skipped_with_its_reason():
    details = stage_records(mode="append")
    details["03_load"]["batch_rows"] = 3
    table = gold.reconcile(details)
    assert "MISMATCH" not in set(table["status"])
    assert table.loc[table["hop"] == "PostgreSQL rows of this batch", "status"].item() == "skipped: append"


def test_reconcile_without_a_stage_record_says_which():
    details = stage_records()
    details["03_load"] = None
    with pytest.raises(ReconciliationError, match="no record of stage\\(s\\) 03_load"):
        gold.reconcile(details)
