"""lib.changes: the change report between two runs' gold tables, as frames and as Parquet, and its JSON."""

from __future__ import annotations

import io
import json

import pandas as pd
import pyarrow as pa
import pytest

from lib import changes, formats, quality, source, transform


@pytest.fixture(scope="module")
def clean():
    records = source.parse_payload(source.snapshot_bytes())
    return quality.validate(transform.flatten(records), records).clean


def between(previous, current, run):
    """`of_parquet` with its added and removed keys as lists, as `of_frames` gives them."""
    report = changes.of_parquet(previous, current, run)
    return {**report, "added": report["added"].to_pylist(), "removed": report["removed"].to_pylist()}


def test_first_gold_table_reports_every_country_as_added(clean):
    report = changes.of_frames(None, clean, None)
    assert report["previous_run_id"] is None
    assert report["added"] == sorted(clean["name_common"]) and len(report["added"]) == 250
    assert report["removed"] == [] and report["changed"] == {}


def test_changes_lists_added_removed_and_changed_fields_with_old_and_new(clean):
    previous = clean.head(5).reset_index(drop=True)
    current = pd.concat([previous.iloc[1:], clean.iloc[[10]]], ignore_index=True).copy(deep=True)
    current.loc[0, "population"] = int(previous.loc[1, "population"]) + 1
    current.at[1, "capital"] = ["New Capital"]
    report = changes.of_frames(previous, current, "run-1")
    assert report["previous_run_id"] == "run-1"
    assert report["added"] == [clean.iloc[10]["name_common"]]
    assert report["removed"] == [previous.loc[0, "name_common"]]
    assert report["changed"] == {
        previous.loc[1, "name_common"]: {"population": [int(previous.loc[1, "population"]),
                                                        int(previous.loc[1, "population"]) + 1]},
        previous.loc[2, "name_common"]: {"capital": [list(previous.loc[2, "capital"]), ["New Capital"]]},
    }
    table = changes.table(report)
    assert sorted(table["change"]) == ["added", "changed", "changed", "removed"]
    first = changes.table(report, rows=2)  # a preview: the first rows only, in the same order
    assert first.to_dict(orient="records") == table.head(2).to_dict(orient="records")
    assert changes.table(report, rows=0).columns.tolist() == table.columns.tolist()


def test_nulls_on_both_sides_are_not_a_change(clean):
    previous = clean[clean["subregion"].isna()].reset_index(drop=True)
    current = previous.copy()
    current["subregion"] = float("nan")  # a null read back another way
    assert changes.of_frames(previous, current, "r")["changed"] == {}


def test_an_unchanged_table_after_a_csv_round_trip_has_no_changes(clean):
    back = formats.CSV.decode(formats.csv_encode(clean))
    report = changes.of_frames(clean, back, "r")
    assert report["added"] == report["removed"] == [] and report["changed"] == {}


@pytest.mark.parametrize("encode,batch,shuffled", [("parquet", None, True), ("csv", None, True),
                                                    ("parquet", 7, True), ("parquet", 7, False)])
def test_changes_between_parquet_tables_is_the_report_changes_gives(clean, encode, batch, shuffled, monkeypatch):
    """The column-wise comparison of two tables given as bytes says exactly what `changes` says of
    the same tables as frames: added, removed, each changed field with old and new, in key order;
    whether the tables' rows are in the same order or not, read whole or 7 rows at a time."""
    from lib import parquet_columns

    if batch:
        monkeypatch.setattr(parquet_columns, "BATCH_ROWS", batch)

    previous = clean.head(60).reset_index(drop=True)
    current = pd.concat([previous.iloc[2:], clean.iloc[[100, 101]]], ignore_index=True).copy(deep=True)
    current.loc[0, "population"] += 1
    current.at[1, "capital"] = ["New Capital", "Second"]
    current.loc[2, "subregion"] = None
    current.loc[3, "area"] = 1.5
    current.loc[4, "flag_alt"] = "changed"
    current.at[5, "timezones"] = list(current.at[5, "timezones"]) + ["UTC+14:00"]
    current.loc[5, "region"] = "Oceania"
    if shuffled:  # row order does not matter
        current = current.sample(frac=1, random_state=3).reset_index(drop=True)

    def as_bytes(frame):
        data = formats.parquet_encode(frame) if encode == "parquet" else formats.csv_encode(frame)
        return data if encode == "parquet" else formats.csv_to_parquet(data)[0]

    for before, run in ((None, None), (previous, "run-1"), (current, "run-2")):
        want = changes.of_frames(before, current, run)
        got = between(None if before is None else as_bytes(before), as_bytes(current), run)
        assert json.dumps(got, default=str) == json.dumps(want, default=str)
    assert len(between(as_bytes(previous), as_bytes(current), "r")["changed"]) == 6


@pytest.mark.parametrize("chunk", [1, 2, 10_000])
def test_write_changes_writes_the_text_json_dumps_gives_piece_by_piece(clean, chunk):
    """changes.json is streamed: the same bytes as json.dumps(report, indent=2), whether the added and
    removed keys are lists or Arrow arrays, however many keys are encoded at a time."""
    import json


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
            changes.write_json(given, sink, chunk=chunk)
            assert sink.getvalue() == want


def test_changes_arrow_keeps_the_added_and_removed_keys_in_arrow_in_order(clean):
    current = formats.parquet_encode(clean.iloc[::-1].reset_index(drop=True))
    report = changes.of_parquet(None, current, None)
    assert report["added"].to_pylist() == sorted(clean["name_common"]) and len(report["removed"]) == 0
    previous = formats.parquet_encode(clean.head(100))
    report = changes.of_parquet(previous, formats.parquet_encode(clean.iloc[50:]), "r")
    assert report["added"].to_pylist() == sorted(clean["name_common"].iloc[100:])
    assert report["removed"].to_pylist() == sorted(clean["name_common"].iloc[:50]) and report["changed"] == {}


def test_a_column_added_since_the_previous_table_is_a_change_from_null(clean):
    """A contract column the previous gold table was written without reads as null there: each
    shared country gains its value, in both comparisons."""
    previous = clean.drop(columns=["flag_alt"]).head(5)
    current = clean.head(5)
    by_frames = changes.of_frames(previous, current, "r")
    by_parquet = between(formats.parquet_encode(previous), formats.parquet_encode(current), "r")
    assert by_frames == by_parquet
    assert by_frames["changed"] == {k: {"flag_alt": [None, alt]} for k, alt in zip(current["name_common"],
                                                                                    current["flag_alt"])}


def test_listed_json_reads_the_first_rows_of_changes_json_as_listed_gives_them(clean):
    """The run page's change table, read from changes.json as a stream: the same rows `listed` gives of
    the parsed file, at every cut (inside the added, removed, changed and held parts), and no further
    than needed (a file cut short after the rows asked still gives them)."""
    report = {"previous_run_id": "run-1", "added": ["Åland", 'q", '], "removed": ["X", "Y", "Z"],
              "changed": {"A": {"capital": [["x"], ["y", "z"]], "area": [1.5, None], "population": [1, 2]},
                          'B"\n': {"region": ["Asia", "Europe"]}},
              "held": {"H": "population: not an integer", "I": "area: negative"}}
    sink = io.BytesIO()
    changes.write_json(report, sink, chunk=2)
    data = sink.getvalue()
    whole = changes.listed(json.loads(data))
    assert len(whole) == 11
    for limit in range(0, 13):
        assert changes.listed_json(io.BytesIO(data), limit) == changes.listed(json.loads(data), limit)
    big = {"previous_run_id": "r", "added": [], "removed": pa.array([f"k{i:07d}" for i in range(200_000)]),
           "changed": {}}
    sink = io.BytesIO()
    changes.write_json(big, sink)
    head = sink.getvalue()[:64 << 10]  # the first 64 KiB only: enough for the first rows
    assert [r["country"] for r in changes.listed_json(io.BytesIO(head), 1001)] == [f"k{i:07d}" for i in range(1001)]


def test_a_previous_table_in_many_row_groups_compares_as_one(clean):
    """Keys read in the pieces Parquet stores them in (a CSV gold table converted batch by batch, a
    table written by another tool) are matched as one column."""
    import pyarrow.parquet as pq

    previous = clean.head(120).reset_index(drop=True)
    current = clean.iloc[40:200].reset_index(drop=True).copy(deep=True)
    current.loc[3, "population"] += 7
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(previous, preserve_index=False), sink, row_group_size=16)
    assert pq.ParquetFile(io.BytesIO(sink.getvalue())).num_row_groups == 8
    got = between(sink.getvalue(), formats.parquet_encode(current), "r")
    assert json.dumps(got, default=str) == json.dumps(changes.of_frames(previous, current, "r"), default=str)
    assert len(got["removed"]) == 40 and len(got["added"]) == 80 and len(got["changed"]) == 1
