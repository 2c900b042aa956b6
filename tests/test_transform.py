"""lib.transform: flattening source records into the contract's columns."""

from __future__ import annotations

import pytest

from lib import source, transform
from lib.contract import COLUMNS


@pytest.fixture(scope="module")
def records():
    return source.parse_payload(source.snapshot_bytes())


@pytest.fixture(scope="module")
def flat(records):
    return transform.flatten(records)


def row(flat, name):
    return flat[flat["name_common"] == name].iloc[0]


def flatten_one(record: dict) -> dict:
    return transform.flatten([record]).iloc[0].to_dict()


def test_flatten_gives_one_row_per_record_in_source_order_with_contract_columns(records, flat):
    assert list(flat.columns) == COLUMNS
    assert len(flat) == 250 and flat.index.name == "record"
    assert list(flat["name_common"]) == [r["name"]["common"] for r in records]
    assert all(dtype == object for dtype in flat.dtypes)  # nothing coerced before validation


def test_flatten_undoes_the_nesting_with_sorted_codes():
    record = {
        "name": {"common": "Aruba", "official": "Aruba", "nativeName": {}},
        "capital": ["Oranjestad"], "population": 107566, "area": 180, "region": "Americas",
        "subregion": "Caribbean", "languages": {"pap": "Papiamento", "nld": "Dutch"},
        "currencies": {"AWG": {"name": "Aruban florin", "symbol": "ƒ"}},
        "flags": {"png": "p.png", "svg": "s.svg", "alt": "blue"}, "timezones": ["UTC-04:00"],
    }
    assert flatten_one(record) == {
        "name_common": "Aruba", "name_official": "Aruba", "capital": ["Oranjestad"],
        "population": 107566, "area": 180, "region": "Americas", "subregion": "Caribbean",
        "language_codes": ["nld", "pap"], "language_names": ["Dutch", "Papiamento"],
        "currency_codes": ["AWG"], "currency_names": ["Aruban florin"],
        "flag_png": "p.png", "flag_svg": "s.svg", "flag_alt": "blue", "timezones": ["UTC-04:00"],
    }


def test_flatten_turns_blanks_and_missing_parts_into_nulls_and_empty_lists():
    flat = flatten_one({"name": {"common": "", "official": "X"}, "region": "", "flags": None})
    assert flat["name_common"] is None and flat["region"] is None
    assert flat["flag_png"] is None and flat["subregion"] is None
    assert flat["capital"] == [] and flat["timezones"] == [] and flat["language_codes"] == []
    assert flat["population"] is None and flat["area"] is None


def test_flatten_keeps_wrong_shapes_for_the_contract_to_judge():
    flat = flatten_one({"name": "France", "capital": "Paris", "languages": ["fra"]})
    assert flat["name_common"] is None  # a name that is not an object has no common name
    assert flat["capital"] == "Paris"
    assert flat["language_codes"] == ["fra"]


def test_source_quirks_survive_flattening(flat):
    no_capital = sorted(flat[flat["capital"].map(len) == 0]["name_common"])
    assert no_capital == ["Antarctica", "Bouvet Island", "Heard Island and McDonald Islands", "Macau"]
    assert row(flat, "Palestine")["capital"] == ["Ramallah", "Jerusalem"]
    assert row(flat, "South Africa")["capital"] == ["Pretoria", "Bloemfontein", "Cape Town"]
    assert row(flat, "Monaco")["area"] == 2.02 and row(flat, "Vatican City")["area"] == 0.49
    assert row(flat, "Bouvet Island")["population"] == 0
    assert row(flat, "Antarctica")["subregion"] is None


def test_every_column_is_read_as_the_contract_declares_it(records):
    """One flatten: a column's values are its declared source read from each record."""
    from lib import contract

    flat = transform.flatten(records[:20])
    for c in contract.CONTRACT:
        assert flat[c.name].tolist() == [c.source.read(r) for r in records[:20]], c.name
