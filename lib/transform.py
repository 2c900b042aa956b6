"""Raw REST Countries records → one tidy row per country, and the CSV form that silver, the database
export and gold share (list columns as JSON arrays)."""

from __future__ import annotations

import io
import json

import pandas as pd

from lib.quality import COLUMNS, LIST_COLUMNS, TEXT_COLUMNS


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


def to_csv(frame: pd.DataFrame, columns: list[str] | None = None) -> bytes:
    """CSV with list columns as JSON arrays and nulls as empty fields (COPY's CSV null)."""
    out = frame[columns or list(frame.columns)]
    out = out.assign(**{col: out[col].map(lambda v: json.dumps(list(v), ensure_ascii=False))
                        for col in LIST_COLUMNS if col in out})
    buf = io.BytesIO()
    out.to_csv(buf, index=False, lineterminator="\n", encoding="utf-8")
    return buf.getvalue()


def read_csv(data: bytes) -> pd.DataFrame:
    """A silver, export or gold CSV back into contract types (extra columns are kept as text)."""
    frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in frame]
    if missing:
        raise ValueError(f"CSV lacks contract columns: {', '.join(missing)}")
    for col in LIST_COLUMNS:
        frame[col] = frame[col].map(json.loads).astype(object)
    for col in TEXT_COLUMNS:
        # Built as an object Series: with pandas 3 `.map` re-infers a string dtype and None becomes NaN.
        frame[col] = pd.Series([None if v == "" else v for v in frame[col]], index=frame.index, dtype=object)
    frame["population"] = frame["population"].astype("int64")
    frame["area"] = frame["area"].astype("float64")
    return frame
