"""The change report between two runs' gold tables: countries added, removed and changed
(field: [old, new]), as stage 5 writes it to changes.json and `run_pipeline.py diff` prints it."""

from __future__ import annotations

import json
import math
from itertools import chain, islice
from typing import TYPE_CHECKING

import ijson

from lib import formats, memory, parquet_columns
from lib.contract import COLUMNS, KEY, LIST_COLUMNS

if TYPE_CHECKING:  # numpy and pandas are imported where tables are compared: the report pages need neither
    import pandas as pd


def _plain(value):
    """A cell as a plain Python value, so the JSON report keeps numbers as numbers and a null is None
    however it was read (None or NaN)."""
    if type(value).__module__ == "numpy":  # a NumPy scalar
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return list(value) if isinstance(value, (list, tuple)) else value


def _same(old, new) -> bool:
    """Whether two cells hold the same value, as the change report sees it (`_plain` on both sides),
    with a fast path for the common cases."""
    if old is new:
        return True
    kind = type(old)
    if kind is type(new) and kind in (str, int, list):
        return old == new
    return _plain(old) == _plain(new)


def of_frames(previous: pd.DataFrame | None, current: pd.DataFrame, previous_run_id: str | None) -> dict:
    """Countries added, removed and changed (field: [old, new]) since the previous gold table.
    Compared column by column over the shared keys (no per-cell lookups), so a table of a million
    rows compares in seconds."""
    import numpy as np

    if previous is None:
        return {"previous_run_id": None, "added": sorted(current[KEY]), "removed": [], "changed": {}}
    old = previous.set_index(KEY).reindex(columns=COLUMNS[1:])  # a column it lacks: nulls
    new = current.set_index(KEY)[COLUMNS[1:]]
    shared = sorted(set(old.index) & set(new.index))
    old_values = {col: old[col].reindex(shared).tolist() for col in COLUMNS[1:]}
    new_values = {col: new[col].reindex(shared).tolist() for col in COLUMNS[1:]}
    differs = {col: np.fromiter((not _same(a, b) for a, b in zip(old_values[col], new_values[col])),
                                dtype=bool, count=len(shared)) for col in COLUMNS[1:]}
    changed: dict[str, dict] = {}
    if shared:
        for i in np.flatnonzero(np.logical_or.reduce(list(differs.values()))):
            changed[shared[i]] = {col: [_plain(old_values[col][i]), _plain(new_values[col][i])]
                                  for col in COLUMNS[1:] if differs[col][i]}
    return {
        "previous_run_id": previous_run_id,
        "added": sorted(set(new.index) - set(old.index)),
        "removed": sorted(set(old.index) - set(new.index)),
        "changed": changed,
    }


def of_parquet(previous, current: bytes, previous_run_id: str | None) -> dict:
    """The change report of two gold tables given as Parquet (bytes, or the previous one as a file
    on disk: lib/parquet_columns.py `source`), read one column at a time: the
    keys are matched once, then each column of the shared keys is compared in Arrow (lists by their
    canonical JSON text, equal exactly when the lists are; nulls equal nulls, and NaN equals NaN, as
    `_plain` sees them). Only the differing cells and their keys become Python values; the added and
    removed keys stay sorted Arrow arrays (a first table of a million rows adds a million keys), so
    two tables of a million rows compare in bounded memory. The report is the one `of_frames` gives
    for the same tables, lists aside."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    def in_order(keys):  # Arrow orders text by its UTF-8 bytes: the code point order of sorted()
        return keys.take(pc.array_sort_indices(keys))

    new_keys = parquet_columns.whole(current, KEY)
    if previous is None:
        return {"previous_run_id": None, "added": in_order(new_keys), "removed": new_keys.slice(0, 0), "changed": {}}
    # Each previous row's row in the current table: one hash table, of the current keys (a rerun of
    # 100,000 rows into a million rows hashes 100,000 keys, not a million); the previous keys stay in
    # the pieces Parquet gives them in, and only the removed ones are kept once matched.
    old_keys = parquet_columns.whole(previous, KEY, combine=False)
    at = pc.index_in(old_keys, value_set=new_keys)
    kept = pc.is_valid(at)
    removed = in_order(old_keys.filter(pc.invert(kept)))
    old_rows = np.flatnonzero(kept.to_numpy(zero_copy_only=False))  # the shared rows, in each table
    new_rows = at.filter(kept).to_numpy(zero_copy_only=False).astype(np.int64)
    del old_keys, at, kept
    matched = np.zeros(len(new_keys), dtype=bool)
    matched[new_rows] = True
    added = in_order(new_keys.filter(pa.array(~matched)))
    del matched
    memory.release()  # the hash table that matched the keys (Arrow's pool would keep its pages)
    differing: dict[str, tuple] = {}  # column: (positions among the shared rows, old values, new values)
    written = set(pq.read_schema(parquet_columns.source(previous)).names)
    for col in COLUMNS[1:]:
        if col not in written:  # a column added to the contract since: every shared row gains its value
            new = parquet_columns.at(current, col, new_rows)
            where = np.flatnonzero(pc.is_valid(new).to_numpy(zero_copy_only=False))
            differing[col] = (where, [None] * len(where), new.take(pa.array(where)).to_pylist())
            continue
        found = []  # (positions, old values, new values) of the differing cells, a slice of pairs at a time
        for index, old, new in parquet_columns.pairs(previous, current, col, old_rows, new_rows):
            a, b = (formats.json_lists(old), formats.json_lists(new)) if col in LIST_COLUMNS else (old, new)
            if a.type != b.type:
                a, b = pc.cast(a, pa.large_string()), pc.cast(b, pa.large_string())
            same = pc.or_(pc.fill_null(pc.equal(a, b), False), pc.and_(pc.is_null(a), pc.is_null(b)))
            if pa.types.is_floating(a.type):
                same = pc.or_(same, pc.fill_null(pc.and_(pc.is_nan(a), pc.is_nan(b)), False))
            where = np.flatnonzero(~same.to_numpy(zero_copy_only=False))
            if len(where):
                found.append((index[where], old.take(pa.array(where)).to_pylist(), new.take(pa.array(where)).to_pylist()))
        if found:
            where = np.concatenate([w for w, _, _ in found])
            order = np.argsort(where, kind="stable")
            olds, news = [v for _, o, _ in found for v in o], [v for _, _, n in found for v in n]
            differing[col] = (where[order], [olds[i] for i in order], [news[i] for i in order])
    rows = np.unique(np.concatenate([w for w, _, _ in differing.values()])) if differing else np.array([], int)
    keys = new_keys.take(pa.array(new_rows[rows])).to_pylist() if len(rows) else []
    changed: dict[str, dict] = {}
    for col in COLUMNS[1:]:
        if col in differing:
            where, olds, news = differing[col]
            for i, o, n in zip(np.searchsorted(rows, where).tolist(), olds, news):
                changed.setdefault(keys[i], {})[col] = [_plain(o), _plain(n)]
    return {
        "previous_run_id": previous_run_id,
        "added": added,
        "removed": removed,
        "changed": {k: changed[k] for k in sorted(changed)},
    }


def write_json(report: dict, sink, chunk: int = 10_000) -> None:
    """The change report as the JSON text `json.dumps(report, indent=2, ensure_ascii=False,
    default=str)` gives, written to a binary `sink` piece by piece: the added and removed keys may be
    Arrow arrays (`of_parquet`) or lists and are encoded `chunk` keys at a time, so a million keys
    are never one Python list nor one string."""
    def text(value) -> str:  # a value at the report's second level, indented as json.dumps indents it
        return json.dumps(value, indent=2, ensure_ascii=False, default=str).replace("\n", "\n  ")

    sink.write(f'{{\n  "previous_run_id": {text(report["previous_run_id"])},\n'.encode())
    for name in ("added", "removed"):
        keys = report[name]
        sink.write(f'  "{name}": ['.encode())
        for at in range(0, len(keys), chunk):
            part = keys[at:at + chunk]
            part = part.to_pylist() if hasattr(part, "to_pylist") else list(part)
            # The C encoder (no indent) with the indented separator: the same text, at C speed.
            body = json.dumps(part, ensure_ascii=False, separators=(",\n    ", ": "))[1:-1]
            sink.write(((",\n    " if at else "\n    ") + body).encode())
        sink.write(("\n  ],\n" if len(keys) else "],\n").encode())
    sink.write(f'  "changed": {text(report["changed"])}'.encode())
    if "held" in report:  # keys quarantined this run, kept current: key → why
        sink.write(f',\n  "held": {text(report["held"])}'.encode())
    sink.write(b"\n}")


COLUMNS_SHOWN = ("country", "change", "field", "old", "new")


def listed(report: dict, limit: int | None = None) -> list[dict]:
    """The change report as rows (`COLUMNS_SHOWN`), one per added, removed or held country and per
    changed field; only the first `limit` rows when given (a preview of a million added countries
    stays small)."""
    found = chain(
        ({"country": k, "change": "added", "field": "", "old": "", "new": ""} for k in report["added"]),
        ({"country": k, "change": "removed", "field": "", "old": "", "new": ""} for k in report["removed"]),
        ({"country": k, "change": "changed", "field": f, "old": o, "new": n}
         for k, fields in report["changed"].items() for f, (o, n) in fields.items()),
        ({"country": k, "change": "held in quarantine", "field": "", "old": "", "new": why}
         for k, why in (report.get("held") or {}).items()))
    return list(islice(found, limit))


def listed_json(fileobj, limit: int) -> list[dict]:
    """`listed(json.load(fileobj), limit)` of a changes.json (`write_json`) read as a stream: the file
    is parsed only as far as its first `limit` rows, and only those become Python values (the page of
    a rerun that retired 900,000 countries reads the first of them, not a list of 900,000)."""
    rows: list[dict] = []
    events = ijson.parse(fileobj, use_float=True)  # numbers as json.load gives them
    for prefix, event, value in events:
        if len(rows) >= limit:
            break
        if prefix in ("added.item", "removed.item"):
            rows.append({"country": value, "change": prefix.split(".")[0], "field": "", "old": "", "new": ""})
        elif prefix in ("changed", "held") and event == "map_key":
            built, depth = ijson.ObjectBuilder(), 0  # this country's value, whole
            for _, inner, item in events:
                built.event(inner, item)
                depth += (inner in ("start_map", "start_array")) - (inner in ("end_map", "end_array"))
                if depth == 0:
                    break
            if prefix == "changed":
                rows += [{"country": value, "change": "changed", "field": f, "old": o, "new": n}
                         for f, (o, n) in built.value.items()]
            else:
                rows.append({"country": value, "change": "held in quarantine", "field": "", "old": "",
                             "new": built.value})
    return rows[:limit]


def table(report: dict, rows: int | None = None) -> pd.DataFrame:
    """`listed` as a table: its first `rows` rows when given."""
    import pandas as pd

    return pd.DataFrame(listed(report, rows), columns=list(COLUMNS_SHOWN))
