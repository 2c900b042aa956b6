"""lib.aggregates: the gold aggregates, exact sums, every registered aggregate written."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from lib import aggregates, quality, source, transform


@pytest.fixture(scope="module")
def clean():
    records = source.parse_payload(source.snapshot_bytes())
    return quality.validate(transform.flatten(records), records).clean


def test_region_aggregates_add_up_to_the_whole_table(clean):
    agg = aggregates.by_region(clean)
    assert list(agg.columns) == ["region", "countries", "population", "area_km2", "density_per_km2"]
    assert set(agg["region"]) == set(clean["region"])
    assert agg["countries"].sum() == 250
    assert agg["population"].sum() == clean["population"].sum()
    assert agg["area_km2"].sum() == pytest.approx(clean["area"].sum())
    assert list(agg["population"]) == sorted(agg["population"], reverse=True)
    europe = agg.set_index("region").loc["Europe"]
    assert europe["density_per_km2"] == round(europe["population"] / europe["area_km2"], 2)


def test_subregion_aggregates_name_a_missing_subregion(clean):
    agg = aggregates.by_subregion(clean)
    assert list(agg.columns[:2]) == ["region", "subregion"]
    assert agg["countries"].sum() == 250
    none = agg[agg["subregion"] == "(none)"]
    assert none["countries"].sum() == clean["subregion"].isna().sum() == 5


def test_density_is_empty_where_the_area_is_zero(clean):
    frame = clean.head(2).copy()
    frame["region"] = ["Asia", "Europe"]
    frame.loc[frame.index[0], "area"] = 0.0
    agg = aggregates.by_region(frame).set_index("region")
    assert math.isnan(agg.at["Asia", "density_per_km2"])
    assert not math.isnan(agg.at["Europe", "density_per_km2"])


def test_area_sums_are_exact(clean):
    europe = clean[clean["region"] == "Europe"]
    agg = aggregates.by_region(clean).set_index("region")
    assert agg.at["Europe", "area_km2"] == math.fsum(europe["area"])
    assert repr(float(agg.at["Europe", "area_km2"])) == "23129737.51"


def test_every_registered_aggregate_is_a_frame_with_countries_adding_up(clean):
    assert {"by_region", "by_subregion"} <= set(aggregates.AGGREGATES)
    for name, fn in aggregates.AGGREGATES.items():
        assert fn(clean)["countries"].sum() == 250, name


def test_the_aggregates_need_only_the_columns_they_declare(clean):
    narrow = clean[aggregates.COLUMNS]
    for name, fn in aggregates.AGGREGATES.items():
        pd.testing.assert_frame_equal(fn(narrow), fn(clean), obj=name)


def test_sums_past_int64_are_exact(clean):
    frame = clean[aggregates.COLUMNS].copy()
    frame.loc[frame["region"] == "Oceania", "population"] = 2**63 - 1
    people = aggregates.by_region(frame).set_index("region")["population"]
    assert int(people["Oceania"]) == (2**63 - 1) * int((clean["region"] == "Oceania").sum())
    assert int(people["Europe"]) == int(clean.loc[clean["region"] == "Europe", "population"].sum())
