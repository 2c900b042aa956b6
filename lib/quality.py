"""Record-level validation against the silver contract (lib/contract.py) with quarantine, schema
drift, and the content hashes and fingerprints that reconciliation compares at every hop."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

from lib.formats import json_lists, json_strings, json_text, large_text, pyarrow_compute
from lib.contract import CONTRACT, COLUMNS, KEY, LIST_COLUMNS, REGIONS, SOURCE_FIELDS, TEXT_COLUMNS, VERSION, Column

if TYPE_CHECKING:  # pandas is imported where frames are made: a publish or a report hashes none
    import pandas as pd

TIMEZONE = re.compile(r"^UTC([+-]\d{2}:\d{2})?$")
# http(s), a host (a name or [IPv6], no userinfo), a port maybe; no space nor (bidi) control character.
_NOT_IN_URL = r"\s\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069"
WEB_URL = re.compile(rf"https?://(?:[^{_NOT_IN_URL}/?#@:\[\]\\]+|\[[0-9a-f:.]+\])(?::[0-9]{{1,5}})?"
                     rf"(?:[/?#][^{_NOT_IN_URL}]*)?", re.IGNORECASE)
# A B-tree index entry holds at most ~2700 bytes: the key (primary key, history index) must fit.
KEY_MAX_BYTES = 2000


# --- element rules --------------------------------------------------------------------------------

def _is_text(v) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _is_text_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


BIGINT_MAX = 2**63 - 1  # larger counts cannot be typed (int64) nor stored (bigint)


def _is_count(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return 0 <= v <= BIGINT_MAX
    return isinstance(v, float) and v.is_integer() and 0 <= v < 2.0**63


def _is_measure(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0


def _is_timezone_list(v) -> bool:
    return _is_text_list(v) and len(v) > 0 and all(TIMEZONE.match(x) for x in v)


def _has_nul(v) -> bool:
    return isinstance(v, str) and "\x00" in v


def _has_lone_surrogate(v) -> bool:
    if not isinstance(v, str):
        return False
    try:
        v.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _texts(v) -> list:
    return v if isinstance(v, list) else [v]


def safe_text(v):
    """A string that can be written anywhere (UTF-8): lone surrogates as \\udXXX escapes. For the
    quarantine and previews only; silver never holds such a value (it is quarantined)."""
    if isinstance(v, list):
        return [safe_text(x) for x in v]
    if isinstance(v, str) and _has_lone_surrogate(v):
        return v.encode("utf-8", "backslashreplace").decode("utf-8")
    return v


class _Columns:
    """What `unstorable` and the record rules both look at in each column of a flattened frame
    (its values, the set of their types, a list column's items and theirs), found once."""

    def __init__(self, frame: pd.DataFrame):
        self.frame = frame
        self._values, self._types, self._items = {}, {}, {}  # by column name

    def values(self, name: str) -> list:
        if name not in self._values:
            self._values[name] = self.frame[name].tolist()
        return self._values[name]

    def types(self, name: str) -> set:
        if name not in self._types:
            self._types[name] = set(map(type, self.values(name)))
        return self._types[name]

    def items(self, name: str) -> tuple[list, set] | None:
        """A column of lists only: all their items in one list, and the set of the items' types."""
        if name not in self._items:
            found = None
            if self.types(name) <= {list}:
                items = list(chain.from_iterable(self.values(name)))
                found = items, set(map(type, items))
            self._items[name] = found
        return self._items[name]


def _all_texts(columns: _Columns, name: str) -> list[str] | None:
    """Every text of a column of texts (nulls left out) or of lists of texts, in one list; None
    when the column holds anything else (then each value is looked at)."""
    types, values = columns.types(name), columns.values(name)
    if types <= {str, type(None)}:
        return [v for v in values if v is not None] if type(None) in types else values
    if types == {list}:
        items, item_types = columns.items(name)
        if item_types <= {str}:
            return items
    return None


def _storable(texts: list[str]) -> bool:
    """No NUL and no lone surrogate in any of these texts (one join, one encode)."""
    joined = "".join(texts)
    return "\x00" not in joined and not _has_lone_surrogate(joined)


def unstorable(frame: pd.DataFrame, columns: _Columns | None = None) -> dict[int, list[str]]:
    """Text that cannot survive every hop byte for byte, refused by field name: PostgreSQL text
    cannot hold NUL, UTF-8 (Parquet, CSV, PostgreSQL) cannot encode a lone surrogate, and a key
    longer than KEY_MAX_BYTES cannot be indexed (other text may be as long as it likes). Checked
    here rather than by the record rules, whose reasons show the value. Each column is first
    screened as a whole (its texts joined and encoded once); only a column that holds such text
    (or values of other kinds) is gone through value by value."""
    columns = columns or _Columns(frame)
    reasons: dict[int, list[str]] = {}
    keys = columns.values(KEY)
    if columns.types(KEY) <= {str, type(None)} and max(map(len, filter(None, keys)), default=0) * 4 <= KEY_MAX_BYTES:
        keys = []  # every key is short enough, whatever its characters
    for index, key in zip(frame.index.tolist(), keys):
        if isinstance(key, str) and len(key) * 4 > KEY_MAX_BYTES and len(key.encode("utf-8", "surrogatepass")) > KEY_MAX_BYTES:
            reasons.setdefault(int(index), []).append(
                f"{KEY} is {len(key.encode('utf-8', 'surrogatepass'))} bytes long, more than the {KEY_MAX_BYTES} "
                "a key may have (PostgreSQL indexes it)")
    for column in TEXT_COLUMNS + LIST_COLUMNS:
        texts = _all_texts(columns, column)
        if texts is not None and _storable(texts):
            continue
        for index, value in frame[column].items():
            texts = _texts(value)
            if any(_has_nul(x) for x in texts):
                reasons.setdefault(int(index), []).append(
                    f"{column} contains a NUL character (\\x00), which PostgreSQL text cannot store")
            if any(_has_lone_surrogate(x) for x in texts):
                reasons.setdefault(int(index), []).append(
                    f"{column} contains a lone surrogate (like \\ud800), which UTF-8 cannot encode")
    return reasons


# Each rule of the contract (lib/contract.py RULES) as a predicate on one value as found.
PREDICATES = {
    "text": _is_text,
    "text list": _is_text_list,
    "count": _is_count,
    "measure": _is_measure,
    "region": lambda v: v in REGIONS,
    "timezones": _is_timezone_list,
    "web url": lambda v: isinstance(v, str) and WEB_URL.fullmatch(v) is not None,
}
# The rules a flattened source record must meet (values as found, nothing coerced), by column:
# (predicate, the reason given when a value breaks it). A null breaks a non-nullable column with
# "<column> is missing" and is not judged further; duplicate keys: see `duplicates`, decided
# independently of the record order.
RECORD_RULES = {c.name: (PREDICATES[c.check.name], c.reason) for c in CONTRACT}

@functools.cache
def silver_schema(unique: bool = True):
    """The typed silver table every later hop reads back, as a pandera schema; `unique=False`: the rows
    of a chunk, whose keys the caller settles across chunks. pandera is imported here, when rows are
    typed: the processes that only prove and publish (the runner) never pay its ~0.2 s."""
    import pandera.pandas as pandera

    return pandera.DataFrameSchema(
        {c.name: pandera.Column(c.dtype, nullable=c.nullable, unique=unique and c.name == KEY) for c in CONTRACT},
        strict="filter", ordered=False,
        name=f"silver contract v{VERSION}" + ("" if unique else " (rows of a chunk)"))


@dataclass
class Validated:
    clean: pd.DataFrame  # typed, contract columns plus _row_hash
    quarantine: pd.DataFrame  # record, name_common, reasons, record (the source record as JSON)
    duplicates: dict | None = None  # key → how its copies were settled

    @property
    def counts(self) -> dict:
        return {"clean": len(self.clean), "quarantined": len(self.quarantine),
                "records": len(self.clean) + len(self.quarantine)}


def _check_shape(frame: pd.DataFrame) -> None:
    """Frame-level problems (a column missing, unexpected or out of order) cannot be pinned to records."""
    if list(frame.columns) == COLUMNS:
        return
    problems = [f"column {c!r} not in the contract" for c in frame.columns if c not in COLUMNS]
    problems += [f"column {c!r} missing" for c in COLUMNS if c not in frame.columns]
    if not problems:
        problems = ["columns out of the contract's order"]
    raise ValueError("the flattened frame breaks the contract's shape: " + "; ".join(sorted(problems)))


_TIMEZONES = re.compile(r"(?:UTC(?:[+-]\d{2}:\d{2})?\n)*")
_WEB_URLS = re.compile(rf"(?:{WEB_URL.pattern}\n)*", re.IGNORECASE)  # no URL holds a line break


def _column_passes(column: Column, columns: _Columns) -> bool:
    """True when every value of the column surely meets its rule, decided by whole-column
    operations (types as sets, min/max, one regex over the joined texts); False means "look at
    each value", never that one fails."""
    values, types = columns.values(column.name), columns.types(column.name)
    rule = column.check.name
    if rule == "count":
        return types <= {int} and (not values or (min(values) >= 0 and max(values) <= BIGINT_MAX))
    if rule == "measure":
        if not values:
            return True
        try:  # a NaN or an infinity makes the sum NaN or infinite
            return types <= {int, float} and min(values) >= 0 and math.isfinite(sum(values))
        except OverflowError:
            return False
    if rule == "region":
        return types <= {str} and set(values) <= set(REGIONS)
    if column.type.is_list:
        if values and types != {list}:
            return False
        items, item_types = columns.items(column.name)
        if not item_types <= {str}:
            return False
        if rule == "timezones":
            return all(values) and _TIMEZONES.fullmatch("".join(x + "\n" for x in items)) is not None
        return rule == "text list"
    if rule not in ("text", "web url"):
        return False
    texts = [v for v in values if v is not None] if column.nullable else values
    if not set(map(type, texts)) <= {str}:
        return False
    if rule == "web url":
        return _WEB_URLS.fullmatch("".join(x + "\n" for x in texts)) is not None
    return all(map(str.strip, texts))  # none blank


def _reasons(frame: pd.DataFrame, columns: _Columns | None = None) -> dict[int, list[str]]:
    """The record rules, column by column over whole columns: reasons by record (its index label),
    in column order, each naming the value it got (lone surrogates shown escaped)."""
    _check_shape(frame)
    columns = columns or _Columns(frame)
    reasons: dict[int, list[str]] = {}
    labels = frame.index.tolist()
    for column in CONTRACT:
        series = frame[column.name]
        values = columns.values(column.name)
        if _column_passes(column, columns):
            continue
        null = series.isna().tolist()
        check, message = RECORD_RULES[column.name]
        shown = safe_text if column.kind in ("text", "text[]") else (lambda v: v)
        for i in [i for i, (v, n) in enumerate(zip(values, null)) if (not n and not check(v)) or (n and not column.nullable)]:
            if null[i]:
                text = f"{column.name} is missing"
            else:
                got = repr(shown(values[i]))
                text = f"{message} (got {got[:80] + '…' if len(got) > 81 else got})"
            reasons.setdefault(int(labels[i]), []).append(text)
    return reasons


def record_reasons(frame: pd.DataFrame) -> dict[int, list[str]]:
    """Why each record that breaks the contract does (unstorable text, then the record rules), by
    index label; duplicates are settled apart (`duplicates`, or across chunks by the caller)."""
    columns = _Columns(frame)
    reasons = unstorable(frame, columns)
    for index, found in _reasons(frame, columns).items():
        reasons.setdefault(index, []).extend(found)
    return reasons


def copy_shape(values) -> str:
    """A record's flattened values in a form that compares copies of one key."""
    return json.dumps(list(values), sort_keys=True, default=str, ensure_ascii=True)


def settle_copies(key: str, copies: list[tuple[int, str]]) -> tuple[dict[int, str], dict]:
    """The copies of one key, as (record, copy_shape) in record order: identical copies keep the
    first, copies that differ are all quarantined. Returns reasons by record and the summary."""
    if len({shape for _, shape in copies}) == 1:
        reasons = {i: f"{KEY} {safe_text(key)!r}: identical copy of another record (one copy kept)"
                   for i, _ in copies[1:]}
        return reasons, {"copies": len(copies), "outcome": "identical: one copy kept"}
    reasons = {i: (f"{KEY} {safe_text(key)!r} appears {len(copies)} times with different values: "
                   "every copy quarantined") for i, _ in copies}
    return reasons, {"copies": len(copies), "outcome": "different values: all quarantined"}


def duplicates(frame: pd.DataFrame) -> tuple[dict[int, str], dict]:
    """Records sharing a key within one payload, settled so that the outcome does not depend on the
    order the API sent them in: identical copies keep one (the clean table is the same whichever),
    copies that differ are all quarantined. Returns reasons by record and a summary by key."""
    groups: dict[str, list[int]] = {}
    for index, key in frame[KEY].items():
        if isinstance(key, str):
            groups.setdefault(key, []).append(index)
    reasons, summary = {}, {}
    for key, indices in groups.items():
        if len(indices) < 2:
            continue
        found, summary[safe_text(key)] = settle_copies(
            key, [(i, copy_shape(frame.loc[i, COLUMNS])) for i in indices])
        reasons.update(found)
    return reasons, summary


def source_json(record) -> str:
    """A source record as the quarantine keeps it."""
    text = json.dumps(record, ensure_ascii=False, sort_keys=True, default=str)
    return text if not _has_lone_surrogate(text) else json.dumps(record, ensure_ascii=True, sort_keys=True, default=str)


def validate(frame: pd.DataFrame, records: list[dict]) -> Validated:
    """Split flattened records into typed clean rows and quarantined ones with their reasons.
    Every record lands in exactly one of the two."""
    import pandas as pd

    reasons = record_reasons(frame)
    copies, summary = duplicates(frame)
    for index, reason in copies.items():
        reasons.setdefault(index, []).append(reason)
    bad = sorted(reasons)
    quarantine = pd.DataFrame(
        {
            "record": bad,
            "name_common": [safe_text(frame.at[i, KEY]) for i in bad],
            "reasons": [safe_text("; ".join(reasons[i])) for i in bad],
            "source": [source_json(records[i]) for i in bad],
        },
        columns=["record", "name_common", "reasons", "source"],
    )
    good = frame.drop(index=bad)
    clean = typed(good)
    clean["_row_hash"] = row_hashes(clean)
    return Validated(clean.reset_index(drop=True), quarantine, summary)


def typed(frame: pd.DataFrame, unique: bool = True) -> pd.DataFrame:
    """Contract types for rows that met the rules, checked against the typed contract (a chunk of
    a larger table with unique=False: its keys are settled across chunks by the caller)."""
    out = frame.copy()
    for c in CONTRACT:
        out[c.name] = out[c.name].astype(c.dtype)
    return silver_schema(unique).validate(out)


_CANONICAL = json_text


def _canonical_column(kind: str, values: list) -> list:
    """One column's values in the canonical form of `row_hash`, converted column-wise."""
    # The usual case is a column in its canonical form already (a typed frame's): that is checked
    # once for the whole column from the set of its values' types (map and set run in C).
    types = set(map(type, values))
    if kind == "text[]":
        if types <= {list, tuple} and set(map(type, chain.from_iterable(values))) <= {str}:
            return values
        return [[str(x) for x in v] for v in values]
    if kind == "bigint":
        return values if types <= {int} else [None if _null(v) else int(v) for v in values]
    if kind == "double":
        return values if types <= {float} else [None if _null(v) else float(v) for v in values]
    if types <= {str, type(None)}:
        return values
    return [None if v is None or (isinstance(v, float) and math.isnan(v)) else (v if type(v) is str else str(v))
            for v in values]


def _null(value) -> bool:
    """A null however it was read: None, NaN or pandas' NA."""
    # pandas' NA by its type's name: pandas need not be imported to tell it
    return value is None or type(value).__name__ == "NAType" or (isinstance(value, float) and math.isnan(value))


def row_hashes(frame: pd.DataFrame) -> list[str]:
    """`row_hash` of every row of a contract frame, computed column by column (the same hashes,
    several times faster than row by row)."""
    columns = [_canonical_column(c.kind, frame[c.name].tolist()) for c in CONTRACT]
    sha = hashlib.sha256
    return [sha(_CANONICAL(row).encode("utf-8")).hexdigest() for row in zip(*columns)]


def row_hash(values) -> str:
    """sha256 of one row's contract values in a canonical form, the same whichever hop it was read
    from (source, CSV, database)."""
    canonical = []
    for column, value in zip(CONTRACT, values):
        if column.kind == "text[]":
            value = [str(v) for v in value]
        elif column.kind in ("bigint", "double") and _null(value):  # a nullable number's null
            value = None
        elif column.kind == "bigint":
            value = int(value)
        elif column.kind == "double":
            value = float(value)
        elif value is not None and not (isinstance(value, float) and math.isnan(value)):
            value = str(value)
        else:
            value = None
        canonical.append(value)
    return hashlib.sha256(json.dumps(canonical, ensure_ascii=False).encode("utf-8")).hexdigest()


# --- the same hashes from Arrow data, column-wise in pyarrow's compute kernels -----------------------
# `row_hash` is sha256 of json.dumps(values, ensure_ascii=False): "[" + ", ".join(each value's JSON) + "]".
# Each column's JSON text is built here for all rows at once (strings escaped exactly as json.dumps does:
# \\ and \" always, \b \f \n \r \t by name, any other control character as \u00xx), then only
# the sha256 of each row's text is a per-row call. The hashes are identical (tests/test_quality.py).

def _json_column(kind: str, values):
    pa, pc = pyarrow_compute()
    if kind == "text[]":
        return json_lists(values)
    # A number's JSON text; a null (only a nullable column holds one) is JSON null.
    if kind == "bigint":
        if not pa.types.is_integer(values.type):
            return pa.array([None if v is None else str(v) for v in _canonical_column(kind, values.to_pylist())],
                            pa.large_string()).fill_null(large_text("null"))
        return pc.fill_null(pc.cast(values, pa.large_string()), large_text("null"))
    if kind == "double":
        floats = pc.cast(values, pa.float64(), safe=False) if values.type != pa.float64() else values
        return pa.array([None if v is None else float.__repr__(v) for v in floats.to_pylist()],
                        pa.large_string()).fill_null(large_text("null"))
    return pc.fill_null(json_strings(values), large_text("null"))


def arrow_row_hashes(table) -> list[str]:
    """`row_hash` of every row of an Arrow table or record batch holding the contract columns (lists as
    list<string> or as JSON array text, text nulls as null), the same values `row_hashes` gives."""
    import numpy as np

    pa, pc = pyarrow_compute()
    if len(table) == 0:
        return []
    columns = []
    for c in CONTRACT:
        values = table.column(c.name)
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        columns.append(_json_column(c.kind, values))
    rows = pc.binary_join_element_wise(large_text("["), pc.binary_join_element_wise(*columns, large_text(", ")),
                                       large_text("]"), large_text(""))
    if rows.null_count:
        raise ValueError("a row's canonical form is null: a list cell is null")
    offsets = np.frombuffer(rows.buffers()[1], dtype=np.int64)[rows.offset:rows.offset + len(rows) + 1].tolist()
    data = memoryview(rows.buffers()[2])
    sha = hashlib.sha256
    return [sha(data[a:b]).hexdigest() for a, b in zip(offsets, offsets[1:])]


def fingerprint(frame) -> dict:
    """Row count and a content fingerprint of a contract frame (pandas or Arrow), recomputed from its values."""
    return Fingerprint().add(frame).result()


class Fingerprint:
    """`fingerprint` of a table read in chunks: only each row's key and hash are kept (as Arrow text),
    never the rows. The fingerprint is sha256 of the lines "key<TAB>hash" sorted by code point and
    joined by newlines (UTF-8 byte order is code point order)."""

    def __init__(self):
        self.chunks: list = []
        self.rows = 0
        self.joined = False

    def add(self, frame, hashes=None) -> "Fingerprint":
        """Add a pandas frame or an Arrow table/batch; `hashes` (a list or an Arrow array) are its row
        hashes when the caller has just computed them from the same values."""
        pa, pc = pyarrow_compute()
        if not isinstance(frame, (pa.Table, pa.RecordBatch)):  # a pandas frame
            keys = pa.array(frame[KEY].tolist(), pa.large_string())
            hashes = row_hashes(frame) if hashes is None else hashes
        else:
            keys = frame.column(KEY)
            keys = pc.cast(keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys, pa.large_string())
            hashes = arrow_row_hashes(frame) if hashes is None else hashes
        if len(keys):
            hashes = pc.cast(hashes, pa.large_string()) if isinstance(hashes, pa.Array) else pa.array(hashes, pa.large_string())
            self.chunks.append(pc.binary_join_element_wise(keys, hashes, large_text("\t")))
            self.rows += len(keys)
        return self

    def subset(self, masks: list) -> "Fingerprint":
        """The fingerprint of some of the rows added: `masks` holds one boolean array per `add` of a
        non-empty chunk, true for the rows to keep (taken before `result`, which joins the chunks)."""
        _, pc = pyarrow_compute()
        if self.joined:
            raise ValueError("a subset is taken before the result: the chunks are joined by then")
        if len(masks) != len(self.chunks):
            raise ValueError(f"{len(masks)} masks for {len(self.chunks)} chunks")
        out = Fingerprint()
        out.chunks = [pc.filter(lines, mask) for lines, mask in zip(self.chunks, masks)]
        out.rows = sum(len(lines) for lines in out.chunks)
        return out

    def result(self) -> dict:
        pa, pc = pyarrow_compute()
        digest = SortedLines()
        if self.chunks:
            lines = pa.chunked_array(self.chunks, pa.large_string()).combine_chunks()
            self.chunks, self.joined = [lines], True  # the pieces are copied: not kept beside the copy
            order = pc.sort_indices(lines)  # taken a slice at a time: the lines are never held twice
            step = 65_536
            for start in range(0, len(lines), step):
                digest.add(lines.take(order.slice(start, step)).to_pylist())
        return digest.result()


class SortedLines:
    """The fingerprint of lines "key<TAB>hash" given in their sorted order, a slice at a time (by
    `Fingerprint`, or by PostgreSQL sorting them: lib/db_load.py)."""

    def __init__(self):
        self.digest = hashlib.sha256()
        self.rows = 0

    def add(self, lines: list[str]) -> "SortedLines":
        if lines:
            self.digest.update((("\n" if self.rows else "") + "\n".join(lines)).encode())
            self.rows += len(lines)
        return self

    def result(self) -> dict:
        return {"rows": self.rows, "fingerprint": self.digest.hexdigest()}


def drift(records: list[dict]) -> dict:
    """Source fields that are new or missing compared with the expected ten, with record counts."""
    return Drift().add(records).result()


class Drift:
    """`drift` of records read in batches: only the field counts are kept (counted per distinct
    set of fields, which nearly every record shares)."""

    def __init__(self):
        self.shapes: Counter = Counter()

    def add(self, records: list[dict]) -> "Drift":
        self.shapes.update(map(tuple, (r for r in records if isinstance(r, dict))))
        return self

    def result(self) -> dict:
        seen: Counter = Counter()
        for fields, n in self.shapes.items():
            for k in fields:
                seen[k] += n
        total = sum(self.shapes.values())
        return {
            "unexpected_fields": {k: n for k, n in sorted(seen.items()) if k not in SOURCE_FIELDS},
            "missing_fields": {f: total - seen.get(f, 0) for f in SOURCE_FIELDS if seen.get(f, 0) < total},
        }
