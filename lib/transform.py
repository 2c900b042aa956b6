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
    """Every record as a row, in source order, with object columns (nothing coerced yet). The same
    values as `flatten_record` gives, built column by column in one loop over the records."""
    columns = {c: [] for c in COLUMNS}
    (name_common, name_official, capital, population, area, region, subregion, language_codes, language_names,
     currency_codes, currency_names, flag_png, flag_svg, flag_alt, timezones) = (columns[c].append for c in COLUMNS)
    for record in records:
        get = record.get
        name = get("name")
        if isinstance(name, dict):
            common, official = name.get("common"), name.get("official")
            name_common(None if common == "" else common)
            name_official(None if official == "" else official)
        else:
            name_common(None)
            name_official(None)
        capital(get("capital", []))
        population(get("population"))
        area(get("area"))
        value = get("region")
        region(None if value == "" else value)
        value = get("subregion")
        subregion(None if value == "" else value)
        languages = get("languages")
        if isinstance(languages, dict):
            codes = sorted(languages)
            language_codes(codes)
            language_names([languages[c] for c in codes])
        elif languages is None:
            language_codes([])
            language_names([])
        else:
            language_codes(languages)
            language_names(languages)
        currencies = get("currencies")
        if isinstance(currencies, dict):
            codes = sorted(currencies)
            currency_codes(codes)
            currency_names([(currencies[c].get("name") if isinstance(currencies[c], dict) else None) for c in codes])
        elif currencies is None:
            currency_codes([])
            currency_names([])
        else:
            currency_codes(currencies)
            currency_names(currencies)
        flags = get("flags")
        if isinstance(flags, dict):
            for append, key in ((flag_png, "png"), (flag_svg, "svg"), (flag_alt, "alt")):
                value = flags.get(key)
                append(None if value == "" else value)
        else:
            flag_png(None)
            flag_svg(None)
            flag_alt(None)
        timezones(get("timezones", []))
    frame = pd.DataFrame({c: pd.Series(values, dtype=object) for c, values in columns.items()})
    frame.index.name = "record"
    return frame
