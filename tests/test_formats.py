"""lib.formats: the encode/decode pair of each file format gives back the contract's values and types."""

from __future__ import annotations

import csv
import io
import json

import pandas as pd
import pytest

from lib import formats, quality, source, transform
from lib.contract import COLUMNS, LIST_COLUMNS, TEXT_COLUMNS

FORMATS = sorted(formats.FORMATS)


@pytest.fixture(scope="module")
def clean():
    records = source.parse_payload(source.snapshot_bytes())
    return quality.validate(transform.flatten(records), records).clean


@pytest.mark.parametrize("name", FORMATS)
def test_round_trip_keeps_every_value_type_and_row_hash(clean, name):
    fmt = formats.get(name)
    back = fmt.decode(fmt.encode(clean[COLUMNS + ["_row_hash"]]))
    assert list(back.columns) == COLUMNS + ["_row_hash"]
    assert back["population"].dtype == "int64" and back["area"].dtype == "float64"
    pd.testing.assert_frame_equal(back[COLUMNS], clean[COLUMNS], check_dtype=False)
    assert back.loc[back["name_common"] == "Monaco", "area"].item() == 2.02
    assert back.loc[back["name_common"] == "Antarctica", "subregion"].item() is None
    assert list(back["_row_hash"]) == list(clean["_row_hash"])
    assert quality.fingerprint(back) == quality.fingerprint(clean)
    for col in LIST_COLUMNS:
        assert all(isinstance(v, list) for v in back[col])
    for col in TEXT_COLUMNS:
        assert all(v is None or isinstance(v, str) for v in back[col])


@pytest.mark.parametrize("name", FORMATS)
def test_decode_names_missing_contract_columns(clean, name):
    fmt = formats.get(name)
    data = fmt.encode(clean.head(2)[[c for c in COLUMNS if c not in ("area", "timezones")]])
    with pytest.raises(formats.FormatError, match="lacks contract columns: area, timezones"):
        fmt.decode(data)


def test_csv_writes_lists_as_json_arrays_nulls_as_empty_fields_and_keeps_unicode(clean):
    text = formats.csv_encode(clean[clean["name_common"].isin(["Antarctica", "Åland Islands"])]).decode("utf-8")
    assert "Åland Islands" in text and "\\u" not in text
    antarctica = next(line for line in text.splitlines() if line.startswith("Antarctica,"))
    assert ',[],' in antarctica  # no capital: an empty JSON array
    assert ',,' in antarctica  # no subregion: an empty field
    assert text.splitlines()[0].split(",") == list(clean.columns)


def test_csv_of_some_columns_writes_only_those(clean):
    rows = list(csv.reader(io.StringIO(formats.csv_encode(clean.head(2)[["name_common", "capital"]]).decode())))
    assert rows[0] == ["name_common", "capital"]
    assert json.loads(rows[1][1]) == list(clean.iloc[0]["capital"])


def test_parquet_is_smaller_than_csv_for_the_same_table(clean):
    assert len(formats.parquet_encode(clean)) < len(formats.csv_encode(clean))


def test_a_format_is_found_by_name_or_key_and_an_unknown_one_is_refused():
    assert formats.get(formats.DEFAULT_SILVER).name == formats.DEFAULT_SILVER and formats.DEFAULT_GOLD in formats.FORMATS
    assert formats.of_key("countries/run_id=r/capitals_clean.parquet").name == "parquet"
    assert formats.of_key("a/b.csv").content_type == "text/csv"
    with pytest.raises(formats.FormatError, match="'xml' is not one of csv, parquet"):
        formats.get("xml")
    with pytest.raises(formats.FormatError, match="no known format extension"):
        formats.of_key("a/b.json")


# Text that PostgreSQL's array input or the CSV quoting could misread, in a list and in text cells.
AWKWARD = ['q"uote', "back\\slash", "com,ma", "{br}", "}", '"{}"', "ünï €", "", "NULL", "null", " sp ",
           "new\nline", "cr\r", '\\"', "a\\", "tab\t", "'"]


def awkward(clean) -> pd.DataFrame:
    """The silver rows with awkward list elements and texts, their row hashes recomputed."""
    frame = clean[COLUMNS + ["_row_hash"]].copy()
    frame.at[0, "capital"] = AWKWARD
    frame.at[1, "capital"] = []
    frame.at[2, "language_names"] = ["NULL"]
    frame.at[2, "name_official"] = 'The "Official", {name}\n\\ NULL'
    frame.at[3, "flag_alt"] = "NULL"
    frame.at[4, "subregion"] = None
    frame["_row_hash"] = quality.row_hashes(frame)
    return frame


@pytest.mark.parametrize("name", FORMATS)
def test_copy_csv_gives_postgresql_the_silver_values_even_awkward_text(pg, clean, name):
    """The CSV that COPY reads (list cells as PostgreSQL array literals), converted in Arrow from
    either silver format, is read by PostgreSQL as exactly the silver values: lists element for
    element, text nulls as NULL, numbers exact."""
    from lib import db, db_load

    fmt = formats.get(name)
    frame = awkward(clean)
    out = io.BytesIO()
    assert formats.copy_csv(fmt.encode(frame), name, out) == len(frame)
    assert out.getvalue().splitlines()[0].decode().replace('"', "").split(",") == COLUMNS + ["_row_hash"]
    with db.transaction(pg), pg.cursor() as cur:
        db_load._stage_batch(cur, out.getvalue(), "array")
        cur.execute("SELECT * FROM _batch")
        stored = cur.fetchall()
    want = [tuple(list(v) if c in LIST_COLUMNS else v for c, v in zip(frame.columns, row))
            for row in frame.itertuples(index=False)]
    assert stored == want
    assert stored[0][COLUMNS.index("capital")] == AWKWARD


def test_copy_csv_converts_a_large_table_a_batch_at_a_time_into_one_csv(clean, monkeypatch):
    """Past COPY_ROWS rows the Parquet is converted in several batches: one header, every row, the
    same bytes as in one batch."""
    frame = pd.concat([clean] * 3, ignore_index=True)  # 750 rows
    data = formats.get("parquet").encode(frame)
    whole = io.BytesIO()
    assert formats.copy_csv(data, "parquet", whole) == len(frame)
    monkeypatch.setattr(formats, "COPY_ROWS", 100)
    converted, pg_arrays = [], formats.pg_arrays
    monkeypatch.setattr(formats, "pg_arrays", lambda values: converted.append(len(values)) or pg_arrays(values))
    batched = io.BytesIO()
    assert formats.copy_csv(data, "parquet", batched) == len(frame)
    assert max(converted) == 100 and sum(converted) == len(frame) * len(LIST_COLUMNS)
    assert batched.getvalue() == whole.getvalue()
    assert batched.getvalue().count(b'"_row_hash"') == 1


def test_copy_csv_of_no_rows_is_its_header():
    out = io.BytesIO()
    empty = pd.DataFrame({c: pd.Series([], dtype=object) for c in COLUMNS + ["_row_hash"]})
    assert formats.copy_csv(formats.get("csv").encode(empty), "csv", out) == 0
    assert out.getvalue().decode().strip().replace('"', "").split(",") == COLUMNS + ["_row_hash"]


def test_pg_arrays_quotes_every_element_and_keeps_nulls():
    import pyarrow as pa

    values = pa.array([["a", 'b"c', "d\\e"], [], None, ["x", None], [""]], pa.large_list(pa.string()))
    assert formats.pg_arrays(values).to_pylist() == [
        '{"a","b\\"c","d\\\\e"}', "{}", None, '{"x",NULL}', '{""}']
    assert formats.pg_arrays(values.slice(1, 3)).to_pylist() == ["{}", None, '{"x",NULL}']


def test_csv_arrow_batches_lower_case_the_header_and_read_empty_text_as_null(clean):
    frame = clean[COLUMNS].head(3).copy()
    data = formats.csv_encode(frame)
    head, _, rest = data.partition(b"\r\n")
    batches = list(formats.csv_arrow_batches(io.BytesIO(head.upper() + b"\r\n" + rest)))
    assert sum(len(b) for b in batches) == 3 and batches[0].schema.names == COLUMNS
    assert list(formats.csv_arrow_batches(io.BytesIO(head + b"\r\n"))) == []
    with pytest.raises(formats.FormatError, match="lacks contract columns: area"):
        list(formats.csv_arrow_batches(io.BytesIO(formats.csv_encode(frame.drop(columns="area")))))


def test_forward_reader_reads_lines_puts_bytes_back_and_copies_what_it_takes():
    sink = io.BytesIO()
    stream = formats.ForwardReader(io.BytesIO(b"a,b\r\n1,2\n3,4"), sink=sink)
    assert stream.readline() == b"a,b\r\n" and stream.first_line == b"a,b\r\n"
    first = stream.read(1)
    stream.unread(first)
    assert stream.read(3) == b"1,2" and stream.readline() == b"\n" and stream.read() == b"3,4"
    assert stream.read(5) == b"" and stream.readline() == b"" and stream.first_line == b"a,b\r\n"
    assert sink.getvalue() == b"a,b\r\n1,2\n3,4"  # each byte once, however often it was put back


def test_csv_to_parquet_reads_a_stream_that_cannot_seek(clean):
    class Forward(io.RawIOBase):  # a download: read only, no tell or seek
        def __init__(self, data):
            self.data = io.BytesIO(data)

        def readable(self):
            return True

        def read(self, n=-1):
            return self.data.read(n)

        def seekable(self):
            return False

    data = formats.csv_encode(clean[COLUMNS])
    assert formats.csv_to_parquet(Forward(data)) == formats.csv_to_parquet(data)
    head = data[:data.index(b"\n") + 1]
    typed, rows = formats.csv_to_parquet(Forward(head))
    assert rows == 0 and formats.parquet_decode(typed).columns.tolist() == COLUMNS


def test_csv_arrow_batches_join_small_reads_into_batches_of_block_size(clean, monkeypatch):
    import pyarrow as pa

    data = formats.csv_encode(pd.concat([clean[COLUMNS]] * 8, ignore_index=True))
    whole = pa.Table.from_batches(list(formats.csv_arrow_batches(io.BytesIO(data), block_size=1 << 30)))
    assert whole.num_rows == 8 * len(clean)
    monkeypatch.setattr(formats, "READ_BLOCK", 16 << 10)  # the file is read in many small blocks
    one = list(formats.csv_arrow_batches(io.BytesIO(data), block_size=1 << 30))
    assert len(one) == 1 and pa.Table.from_batches(one).equals(whole)
    some = list(formats.csv_arrow_batches(io.BytesIO(data), block_size=64 << 10))
    assert 1 < len(some) < len(data) // (16 << 10) and all(b.nbytes >= 64 << 10 for b in some[:-1])
    assert pa.Table.from_batches(some).equals(whole)
