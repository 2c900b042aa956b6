"""Gold: business aggregates, the change report between runs, and reconciliation across every hop."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from lib.quality import COLUMNS, KEY


class ReconciliationError(RuntimeError):
    """Counts or fingerprints disagree between two hops; the message names the hop."""


def aggregates(frame: pd.DataFrame, by: str) -> pd.DataFrame:
    """Countries, population, area and density per `region` or `subregion` (sorted by population)."""
    keys = ["region", "subregion"] if by == "subregion" else ["region"]
    grouped = frame.assign(subregion=frame["subregion"].fillna("(none)")).groupby(keys, dropna=False)
    out = grouped.agg(countries=(KEY, "count"), population=("population", "sum"), area_km2=("area", "sum"))
    out["density_per_km2"] = (out["population"] / out["area_km2"].where(out["area_km2"] > 0)).round(2)
    return out.reset_index().sort_values("population", ascending=False, ignore_index=True)


def _plain(value):
    """A cell as a plain Python value, so the JSON report keeps numbers as numbers and a null is None
    however it was read (None or NaN)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return list(value) if isinstance(value, (list, tuple)) else value


def changes(previous: pd.DataFrame | None, current: pd.DataFrame, previous_run_id: str | None) -> dict:
    """Countries added, removed and changed (field: [old, new]) since the previous gold table."""
    if previous is None:
        return {"previous_run_id": None, "added": sorted(current[KEY]), "removed": [], "changed": {}}
    old = previous.set_index(KEY)[COLUMNS[1:]]
    new = current.set_index(KEY)[COLUMNS[1:]]
    changed: dict[str, dict] = {}
    for key in sorted(set(old.index) & set(new.index)):
        pairs = {col: [_plain(old.at[key, col]), _plain(new.at[key, col])] for col in COLUMNS[1:]}
        diffs = {col: pair for col, pair in pairs.items() if pair[0] != pair[1]}
        if diffs:
            changed[key] = diffs
    return {
        "previous_run_id": previous_run_id,
        "added": sorted(set(new.index) - set(old.index)),
        "removed": sorted(set(old.index) - set(new.index)),
        "changed": changed,
    }


def changes_table(report: dict) -> pd.DataFrame:
    rows = [{"country": k, "change": "added", "field": "", "old": "", "new": ""} for k in report["added"]]
    rows += [{"country": k, "change": "removed", "field": "", "old": "", "new": ""} for k in report["removed"]]
    rows += [{"country": k, "change": "changed", "field": f, "old": o, "new": n}
             for k, fields in report["changed"].items() for f, (o, n) in fields.items()]
    return pd.DataFrame(rows, columns=["country", "change", "field", "old", "new"])


def reconcile(stages: dict[str, dict | None], gold: dict) -> pd.DataFrame:
    """The record count and content fingerprint at every hop, and whether each hop agrees with the
    one before it. `stages` maps stage name to its record; `gold` is {rows, fingerprint, sha256}.
    Raises ReconciliationError naming the first hop that disagrees (after building the table)."""
    missing = [s for s, rec in stages.items() if rec is None]
    if missing:
        raise ReconciliationError(f"cannot reconcile: no record of stage(s) {', '.join(missing)} in this run")
    ingest, clean, load, export = (stages[s]["details"] for s in ("01_ingest", "02_clean", "03_load", "04_export"))
    hops = [
        ("API response", ingest["records"], ingest["response_sha256"], None),
        ("raw (bronze)", clean["raw_records"], clean["raw_sha256"],
         None if clean.get("backfill_date") else  # a backfill reads other runs' bronze too
         ("API response", ingest["records"] == clean["raw_records"]
          and ingest["response_sha256"] == clean["raw_sha256"])),
        ("clean + quarantine (silver)", f'{clean["clean_rows"]} + {clean["quarantined"]}'
         + (f' + {clean["superseded"]} superseded' if clean.get("superseded") else ""),
         clean["clean_fingerprint"],
         ("raw (bronze)", clean["clean_rows"] + clean["quarantined"] + clean.get("superseded", 0)
          == clean["raw_records"])),
        ("PostgreSQL rows of this batch", load["batch_rows"], load["batch_fingerprint"],
         ("clean + quarantine (silver)", load["mode"] == "append"
          or (load["batch_rows"] == clean["clean_rows"] and load["batch_fingerprint"] == clean["clean_fingerprint"]))),
        ("PostgreSQL current table", load["current_rows"], load["current_fingerprint"], None),
        ("cloud export", export["rows"], export["fingerprint"],
         ("PostgreSQL current table", export["rows"] == load["current_rows"]
          and export["fingerprint"] == load["current_fingerprint"])),
        ("gold", gold["rows"], gold["fingerprint"],
         ("cloud export", gold["rows"] == export["rows"] and gold["fingerprint"] == export["fingerprint"]
          and gold["sha256"] == export["sha256"])),
    ]
    table = pd.DataFrame([
        {"hop": hop, "records": str(rows), "fingerprint": str(fp)[:16],
         "compared with": check[0] if check else "", "status": ("ok" if check[1] else "MISMATCH") if check else "-"}
        for hop, rows, fp, check in hops
    ])
    bad = table[table["status"] == "MISMATCH"]
    if len(bad):
        first = bad.iloc[0]
        raise ReconciliationError(
            f"reconciliation failed at hop '{first['compared with']} → {first['hop']}': "
            f"{first['records']} records, fingerprint {first['fingerprint']}\n{table.to_string(index=False)}")
    return table
