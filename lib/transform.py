"""Raw REST Countries records → one tidy row per country: each contract column read from each record
as the contract declares (`Column.source`), values as found, nothing coerced yet."""

from __future__ import annotations

import pandas as pd

from lib.contract import CONTRACT


def flatten(records: list[dict]) -> pd.DataFrame:
    """Every record as a row, in source order, one object column per contract column (the rules in
    lib/quality.py judge the values next). Built column by column: one pass over the records each."""
    frame = pd.DataFrame({c.name: pd.Series([c.source.read(r) for r in records], dtype=object) for c in CONTRACT})
    frame.index.name = "record"
    return frame
