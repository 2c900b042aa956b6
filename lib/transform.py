"""Raw REST Countries records → one tidy row per country (the contract's columns, values as found)."""

from __future__ import annotations

import pandas as pd

from lib.contract import COLUMNS


def _mapping(value):
    return value if isinstance(value, dict) else ({} if value is None else value)


def _blank_to_none(value):
    return None if value == "" else value


def flatten_record(record: dict) -> dict:
    """One source record as a flat row. Values are kept as found (the contract judges them); only
    the nesting is undone, empty strings become nulls and dict keys are sorted for a stable order."""
    name = _mapping(record.get("name"))
    languages = _mapping(record.get("languages"))
    currencies = _mapping(record.get("currencies"))
    flags = _mapping(record.get("flags"))
    get = lambda m, k: m.get(k) if isinstance(m, dict) else None  # noqa: E731
    lang_codes = sorted(languages) if isinstance(languages, dict) else languages
    cur_codes = sorted(currencies) if isinstance(currencies, dict) else currencies
    return {
        "name_common": _blank_to_none(get(name, "common")),
        "name_official": _blank_to_none(get(name, "official")),
        "capital": record.get("capital", []),
        "population": record.get("population"),
        "area": record.get("area"),
        "region": _blank_to_none(record.get("region")),
        "subregion": _blank_to_none(record.get("subregion")),
        "language_codes": lang_codes,
        "language_names": [languages[c] for c in lang_codes] if isinstance(languages, dict) else languages,
        "currency_codes": cur_codes,
        "currency_names": ([get(currencies[c], "name") for c in cur_codes]
                           if isinstance(currencies, dict) else currencies),
        "flag_png": _blank_to_none(get(flags, "png")),
        "flag_svg": _blank_to_none(get(flags, "svg")),
        "flag_alt": _blank_to_none(get(flags, "alt")),
        "timezones": record.get("timezones", []),
    }


def flatten(records: list[dict]) -> pd.DataFrame:
    """Every record as a row, in source order, with object columns (nothing coerced yet)."""
    rows = [flatten_record(r) for r in records]
    frame = pd.DataFrame({c: pd.Series([row[c] for row in rows], dtype=object) for c in COLUMNS})
    frame.index.name = "record"
    return frame
