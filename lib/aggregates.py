"""Gold aggregates: each function decorated with `@aggregate` is written by the gold stage as its own
object (lib/layout.py `aggregate_key`, named after the function) and shown by its notebook."""

from __future__ import annotations

import decimal
import math
from typing import Callable

import pandas as pd

from lib.contract import KEY

# The columns the aggregates read: only these are taken out of the gold table into pandas.
COLUMNS = [KEY, "region", "subregion", "population", "area"]


def exact_sum(values) -> int:
    """A whole-number column's sum as a Python int: never wrapped around at 2**63 as int64 sums are."""
    return sum(values.tolist())


def _summary(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Countries, population, area and density per group (sorted by population). Sums are exact:
    whole numbers in Python ints (a sum past int64 is stored as a decimal), areas with math.fsum."""
    grouped = frame.assign(subregion=frame["subregion"].fillna("(none)")).groupby(keys, dropna=False)
    out = grouped.agg(countries=(KEY, "count"), population=("population", exact_sum),
                      area_km2=("area", lambda a: math.fsum(a)))
    people = [int(v) for v in out["population"]]
    out["population"] = (pd.Series(people, index=out.index, dtype="int64") if max(people, default=0) < 2**63
                         else pd.Series([decimal.Decimal(v) for v in people], index=out.index, dtype=object))
    area = out["area_km2"].where(out["area_km2"] > 0)
    out["density_per_km2"] = (pd.Series([float(v) for v in people], index=out.index) / area).round(2)
    out = out.reset_index()
    return out.iloc[sorted(range(len(out)), key=lambda i: -people[i])].reset_index(drop=True)


# Every aggregate by name (`@aggregate` adds a function).
AGGREGATES: dict[str, Callable[[pd.DataFrame], pd.DataFrame]] = {}


def aggregate(fn: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[pd.DataFrame], pd.DataFrame]:
    AGGREGATES[fn.__name__] = fn
    return fn


@aggregate
def by_region(frame: pd.DataFrame) -> pd.DataFrame:
    return _summary(frame, ["region"])


@aggregate
def by_subregion(frame: pd.DataFrame) -> pd.DataFrame:
    return _summary(frame, ["region", "subregion"])

