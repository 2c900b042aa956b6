"""lib.quality: the silver contract, quarantine with reasons, drift, row hashes and fingerprints."""

from __future__ import annotations

import copy

import pandas as pd
import pytest

from lib import formats, quality, source, transform
from lib.quality import COLUMNS


@pytest.fixture(scope="module")
def snapshot():
    return source.parse_payload(source.snapshot_bytes())


@pytest.fixture
def records(snapshot):
    return copy.deepcopy(snapshot)


@pytest.fixture(scope="module")
def clean(snapshot):
    return quality.validate(transform.flatten(snapshot), snapshot).clean


def validate(records):
    return quality.validate(transform.flatten(records), records)


def test_the_bundled_snapshot_is_250_clean_rows_and_nothing_quarantined(snapshot):
    result = validate(snapshot)
    assert result.counts == {"clean": 250, "quarantined": 0, "records": 250}
    assert list(result.clean.columns) == COLUMNS + ["_row_hash"]
    assert result.clean["name_common"].is_unique


def test_source_quirks_are_valid_rows(clean):
    by_name = clean.set_index("name_common")
    assert (clean["capital"].map(len) == 0).sum() == 4
    assert len(by_name.at["Palestine", "capital"]) == 2
    assert len(by_name.at["South Africa", "capital"]) == 3
    floats = by_name.loc[["Monaco", "United States Minor Outlying Islands", "Vatican City"], "area"]
    assert list(floats) == [2.02, 34.2, 0.49]
    assert (clean["population"] == 0).sum() >= 1
    assert clean["population"].dtype == "int64" and clean["area"].dtype == "float64"


BREAKAGES = {
    "missing name": (lambda r: r.pop("name"), "name_common is missing"),
    "population lots": (lambda r: r.update(population="lots"),
                        "population must be a whole number >= 0 (got 'lots')"),
    "fractional population": (lambda r: r.update(population=5.5), "population must be a whole number"),
    "boolean population": (lambda r: r.update(population=True), "population must be a whole number"),
    "population past bigint": (lambda r: r.update(population=10**20), "population must be a whole number"),
    "negative area": (lambda r: r.update(area=-5), "area must be a number >= 0 (got -5)"),
    "infinite area": (lambda r: r.update(area=float("inf")), "area must be a number >= 0"),
    "bad region": (lambda r: r.update(region="Atlantis"), "region must be one of"),
    "bad timezone": (lambda r: r.update(timezones=["GMT+1"]), "timezones must be a non-empty list"),
    "no timezone": (lambda r: r.update(timezones=[]), "timezones must be a non-empty list"),
    "capital not a list": (lambda r: r.update(capital="Paris"), "capital must be a list of strings"),
    "blank official name": (lambda r: r["name"].update(official="  "), "name_official must be non-empty text"),
    # A flag is shown as a link or an image: http(s) with a host, nothing a browser would run.
    "javascript flag": (lambda r: r["flags"].update(png="javascript:alert(document.domain)"),
                        "flag_png must be an http(s) URL with a host (got 'javascript:alert(document.domain)')"),
    "data flag": (lambda r: r["flags"].update(svg="data:image/svg+xml,<svg onload=alert(1)>"),
                  "flag_svg must be an http(s) URL with a host"),
    "flag without a host": (lambda r: r["flags"].update(png="https:///w320/fr.png"), "flag_png must be an http(s) URL"),
    "flag without a scheme": (lambda r: r["flags"].update(png="//flagcdn.com/w320/fr.png"), "flag_png must be an http"),
    "flag of another scheme": (lambda r: r["flags"].update(svg="ftp://flagcdn.com/fr.svg"), "flag_svg must be an http"),
    "flag with a userinfo": (lambda r: r["flags"].update(png="https://flagcdn.com@evil.example/fr.png"),
                             "flag_png must be an http(s) URL"),
    "flag with a space": (lambda r: r["flags"].update(png=" javascript:alert(1)"), "flag_png must be an http(s) URL"),
    "flag with a line break": (lambda r: r["flags"].update(png="https://flagcdn.com/fr.png\njavascript:x"),
                               "flag_png must be an http(s) URL"),
    "flag with a control": (lambda r: r["flags"].update(png="https://flagcdn.com/fr\x1b[31m.png"),
                            "flag_png must be an http(s) URL"),
    "flag not text": (lambda r: r["flags"].update(svg=42), "flag_svg must be an http(s) URL with a host (got 42)"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_record_is_quarantined_with_a_reason_naming_the_column(records, breakage):
    breaks, reason = BREAKAGES[breakage]
    breaks(records[7])
    result = validate(records)
    assert result.counts == {"clean": 249, "quarantined": 1, "records": 250}
    bad = result.quarantine.iloc[0]
    assert bad["record"] == 7
    assert reason in bad["reasons"]
    assert len(result.clean) + len(result.quarantine) == len(records)


@pytest.mark.parametrize("url", ["https://flagcdn.com/w320/fr.png", "http://flagcdn.com", "HTTPS://FlagCDN.com:8443/fr.svg",
                                 "https://upload.wikimedia.org/wikipedia/commons/c/c3/Flag_of_France.svg?x=1#top",
                                 "http://[2001:db8::1]:8080/fr.png", "https://xn--drapeaux-9za.example/é.png"])
def test_a_flag_url_of_http_or_https_with_a_host_is_clean(records, url):
    for record in records:  # every record's flag: the whole column passes at once
        record["flags"]["png"] = url
    assert validate(records).counts["quarantined"] == 0
    records[3]["flags"]["png"] = "javascript:void(0)"  # one breaks it: that one alone
    assert validate(records).quarantine["record"].tolist() == [3]


def test_an_identical_duplicate_keeps_one_copy_and_says_so(records):
    records.append(copy.deepcopy(records[3]))
    result = validate(records)
    assert result.counts == {"clean": 250, "quarantined": 1, "records": 251}
    bad = result.quarantine.iloc[0]
    assert bad["record"] == 250
    name = records[3]["name"]["common"]
    assert bad["reasons"] == f"name_common {name!r}: identical copy of another record (one copy kept)"
    assert result.duplicates == {name: {"copies": 2, "outcome": "identical: one copy kept"}}


def test_differing_duplicates_are_all_quarantined_whatever_the_order(records):
    name = records[3]["name"]["common"]
    other = copy.deepcopy(records[3])
    other["population"] += 1
    outcomes = []
    for ordered in (records + [other], [other] + records):
        result = validate(copy.deepcopy(ordered))
        assert result.counts == {"clean": 249, "quarantined": 2, "records": 251}
        assert set(result.quarantine["name_common"]) == {name}
        assert all("appears 2 times with different values: every copy quarantined" in r
                   for r in result.quarantine["reasons"])
        assert result.duplicates == {name: {"copies": 2, "outcome": "different values: all quarantined"}}
        outcomes.append(result.clean.sort_values("name_common", ignore_index=True))
    pd.testing.assert_frame_equal(*outcomes)  # the clean table does not depend on the API's order


def test_several_broken_records_each_land_once_with_all_their_reasons(records):
    records[0].pop("name")
    records[1].update(population="lots", area=-1)
    records[2].update(region="Atlantis")
    records.append(copy.deepcopy(records[10]))
    result = validate(records)
    assert list(result.quarantine["record"]) == [0, 1, 2, 250]
    assert result.counts["clean"] + result.counts["quarantined"] == len(records) == 251
    reasons = result.quarantine.set_index("record")["reasons"]
    assert "population" in reasons[1] and "area" in reasons[1]
    assert "name_official is missing" in reasons[0]


def test_quarantine_keeps_the_source_record_as_json(records):
    records[5]["population"] = "lots"
    bad = validate(records).quarantine.iloc[0]
    assert bad["name_common"] == records[5]["name"]["common"]
    assert '"population": "lots"' in bad["source"]


def test_whole_float_population_is_accepted_and_typed(records):
    records[0]["population"] = 7.0
    result = validate(records)
    assert result.counts["quarantined"] == 0
    assert result.clean.loc[0, "population"] == 7


def test_a_frame_with_an_unexpected_column_breaks_the_shape_not_a_record(snapshot):
    frame = transform.flatten(snapshot[:3]).assign(extra=1)
    with pytest.raises(ValueError, match="shape"):
        quality.validate(frame, snapshot[:3])


def test_drift_reports_unexpected_and_missing_fields(records):
    assert quality.drift(records) == {"unexpected_fields": {}, "missing_fields": {}}
    records[0]["cca2"] = "AW"
    records[1]["cca2"] = "AF"
    del records[2]["flags"]
    assert quality.drift(records) == {"unexpected_fields": {"cca2": 2}, "missing_fields": {"flags": 1}}


def test_row_hash_is_the_same_after_a_csv_round_trip(clean):
    back = formats.CSV.decode(formats.csv_encode(clean[COLUMNS]))
    rehashed = [quality.row_hash(r) for r in back[COLUMNS].itertuples(index=False)]
    assert rehashed == list(clean["_row_hash"])


def test_row_hash_changes_when_a_value_changes(clean):
    values = list(clean[COLUMNS].iloc[0])
    before = quality.row_hash(values)
    values[COLUMNS.index("population")] += 1
    assert quality.row_hash(values) != before
    values = list(clean[COLUMNS].iloc[0])
    values[COLUMNS.index("capital")] = values[COLUMNS.index("capital")] + ["Elsewhere"]
    assert quality.row_hash(values) != before


def test_row_hash_reads_numbers_written_as_text_as_numbers(clean):
    values = list(clean[COLUMNS].iloc[0])
    as_text = list(values)
    as_text[COLUMNS.index("population")] = str(values[COLUMNS.index("population")])
    assert quality.row_hash(as_text) == quality.row_hash(values)


def test_fingerprint_ignores_row_order_but_not_content(clean):
    fp = quality.fingerprint(clean)
    assert fp["rows"] == 250
    assert quality.fingerprint(clean.sample(frac=1, random_state=1)) == fp
    changed = clean.copy()
    changed.loc[0, "population"] += 1
    assert quality.fingerprint(changed)["fingerprint"] != fp["fingerprint"]
    assert quality.fingerprint(clean.iloc[1:])["rows"] == 249


def test_row_hashes_of_a_frame_equal_row_hash_row_by_row_whatever_the_value_forms(clean):
    from lib.contract import COLUMNS

    odd = clean.head(6).copy()
    odd["subregion"] = odd["subregion"].astype(object)
    odd.loc[0, "subregion"] = float("nan")  # a null read back as NaN
    odd.loc[1, "subregion"] = None
    odd["population"] = odd["population"].astype("float64")  # whole numbers as floats
    odd["capital"] = odd["capital"].astype(object)
    odd.at[2, "capital"] = ["Ville", 7]  # a non-text item is hashed as its text
    odd.at[3, "capital"] = ("Tuple",)
    odd.loc[4, "name_official"] = "Ünïcödé \"quoted\" \\ back"
    expected = [quality.row_hash(r) for r in odd[COLUMNS].itertuples(index=False)]
    assert quality.row_hashes(odd) == expected
    assert quality.row_hashes(clean) == list(clean["_row_hash"])


def _awkward(clean):
    """Rows with every kind of text json.dumps escapes, list separators inside values, empty lists,
    nulls and floats at the edges of their notations."""
    odd = clean.head(10).copy().astype(object)
    texts = ['a"b\\c', "tab\tnew\nline\x01\x1f\x7f\b\f\r", "ünï 漢字 😀", "\u2028", 'a","b', "x\\", ',",",', "é",
             'ends",', 'bs\\",']
    for i, text in enumerate(texts):
        odd.at[i, "name_official"] = text
        odd.at[i, "capital"] = [text, "q"] if i % 2 else [text]
        odd.at[i, "flag_alt"] = text
    odd.at[8, "capital"] = []
    odd.at[9, "subregion"] = None
    odd["area"] = [0.1, 1e16, 1e15 + 0.125, 100.0, 1e-5, 123456789.123, -0.0, 5e-324, 1.7976931348623157e308, 2.5]
    odd["population"] = [0, 2**63 - 1, 1, 2, 3, 4, 5, 6, 7, 8]
    return odd


@pytest.mark.parametrize("rows", ["snapshot", "awkward"])
def test_arrow_row_hashes_equal_row_hashes_from_arrow_lists_and_from_csv_json_cells(clean, rows):
    import io

    import pyarrow as pa

    frame = clean if rows == "snapshot" else _awkward(clean)
    expected = quality.row_hashes(frame)
    lists = pa.Table.from_pandas(frame[COLUMNS], preserve_index=False)
    assert quality.arrow_row_hashes(lists) == expected
    (cells,) = list(formats.csv_arrow_batches(io.BytesIO(formats.csv_encode(frame[COLUMNS]))))
    assert quality.arrow_row_hashes(cells) == expected
    # PostgreSQL's array_to_json writes no space after the comma
    compact = cells.set_column(cells.schema.get_field_index("capital"), "capital",
                               pa.array([v.replace('", "', '","') for v in cells.column("capital").to_pylist()]))
    assert quality.arrow_row_hashes(compact) == expected
    # a JSON spelling json.dumps would not write (an escaped letter) is parsed, not trusted
    spelled = cells.set_column(cells.schema.get_field_index("timezones"), "timezones",
                               pa.array([v.replace("U", "\\u0055") for v in cells.column("timezones").to_pylist()]))
    assert quality.arrow_row_hashes(spelled) == expected
    assert quality.fingerprint(lists) == quality.fingerprint(cells) == quality.fingerprint(frame)


def test_a_chunked_fingerprint_sorts_lines_by_code_point_as_python_does():
    import hashlib

    import pyarrow as pa

    keys = ["b", "a", "é", "z", "Z", "漢", "😀", "a b", "a\tb", "ab", "\u00ff", "\u0100"]
    fp = quality.Fingerprint()
    fp.add(pa.table({"name_common": keys[:5]}), hashes=["h"] * 5).add(pa.table({"name_common": keys[5:]}),
                                                                       hashes=["h"] * (len(keys) - 5))
    lines = sorted(f"{k}\th" for k in keys)
    assert fp.result() == {"rows": len(keys), "fingerprint": hashlib.sha256("\n".join(lines).encode()).hexdigest()}
    assert quality.Fingerprint().result()["fingerprint"] == hashlib.sha256(b"").hexdigest()


def test_the_fingerprint_of_a_subset_is_the_fingerprint_of_those_rows_alone(clean):
    import pyarrow as pa

    fp = quality.Fingerprint().add(clean.head(100)).add(clean.iloc[100:0]).add(clean.iloc[100:])
    masks = [pa.array([i % 3 == 0 for i in range(100)]), pa.array([i % 7 == 1 for i in range(100, len(clean))])]
    kept = clean[[i % 3 == 0 if i < 100 else i % 7 == 1 for i in range(len(clean))]]
    assert fp.subset(masks).result() == quality.fingerprint(kept)
    with pytest.raises(ValueError, match="1 masks for 2 chunks"):
        fp.subset(masks[:1])
    assert fp.subset([pa.array([True] * 100), pa.array([True] * (len(clean) - 100))]).result() == fp.result()
    with pytest.raises(ValueError, match="before the result"):
        fp.subset(masks)
