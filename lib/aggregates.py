"""Gold aggregates: each function decorated with `@aggregate` is written by the gold stage as its own
object (lib/layout.py `aggregate_key`, named after the function) and shown by its notebook."""

from __future__ import annotations

import math
from typing import Callable

import pandas as pd

from lib.contract import KEY

# The columns the aggregates read: only these are taken out of the gold table into pandas.
COLUMNS = [KEY, "region", "subregion", "population", "area"]


def _summary(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Countries, population, area and density per group (sorted by population). Sums are exact:
    math.fsum over the values, not a running float sum."""
    grouped = frame.assign(subregion=frame["subregion"].fillna("(none)")).groupby(keys, dropna=False)
    out = grouped.agg(countries=(KEY, "count"), population=("population", "sum"),
                      area_km2=("area", lambda a: math.fsum(a)))
    out["density_per_km2"] = (out["population"] / out["area_km2"].where(out["area_km2"] > 0)).round(2)
    return out.reset_index().sort_values("population", ascending=False, ignore_index=True)


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

