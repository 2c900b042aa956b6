"""lib.db_read against the real embedded PostgreSQL: reads, the CSV export, the table as a run left it."""

from __future__ import annotations

import io
import time

from lib import db_read, formats, quality
from lib.contract import KEY
from tests.db_helpers import SCHEMA, changed, csv, current, load


# --- reads and export --------------------------------------------------------------------------------

def test_the_whole_snapshot_round_trips_through_the_database_with_the_same_fingerprint(pg, clean, table):
    load(pg, csv(clean), table, "r1")
    assert quality.fingerprint(db_read.current(pg, SCHEMA, table)) == quality.fingerprint(clean)
    sink = io.BytesIO()
    rows = db_read.copy_out(pg, SCHEMA, table, sink)
    exported = formats.CSV.decode(sink.getvalue())
    assert rows == 250
    assert quality.fingerprint(exported) == quality.fingerprint(clean)
    assert list(exported["_row_hash"]) == list(clean.sort_values(KEY)["_row_hash"])
    assert table in db_read.tables(pg, SCHEMA) and f"{table}_history" in db_read.tables(pg, SCHEMA)


def test_current_reads_null_text_back_as_none_and_lists_as_lists(pg, clean, table):
    load(pg, csv(clean), table, "r1")
    rows = current(pg, table)
    antarctica = rows.loc["Antarctica"]
    assert antarctica["subregion"] is None  # an empty source subregion is NULL, read back as None
    assert antarctica["capital"] == []
    assert rows.loc["South Africa", "capital"] == ["Pretoria", "Bloemfontein", "Cape Town"]
    assert rows["population"].dtype == "int64" and rows["area"].dtype == "float64"


# --- point in time -----------------------------------------------------------------------------------

def test_as_of_a_run_gives_the_table_as_that_run_left_it(pg, clean, table):
    batch = clean.head(5)
    key = batch.at[1, KEY]
    load(pg, csv(batch), table, "r1")
    time.sleep(0.01)
    load(pg, csv(changed(batch, 1, population=42)), table, "r2")
    old = db_read.as_of(pg, SCHEMA, table, "r1").set_index(KEY)
    new = db_read.as_of(pg, SCHEMA, table, "r2").set_index(KEY)
    assert old.at[key, "population"] == batch.at[1, "population"]
    assert new.at[key, "population"] == 42
    assert len(old) == len(new) == 5
    assert db_read.as_of(pg, SCHEMA, table, "never-ran").empty
