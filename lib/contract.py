"""The silver contract, declared once: for each column where its value comes from in a source record,
its type (and so its PostgreSQL, Arrow and pandas types), the rule every value must meet and its
description. Everything else is derived from here: the API URL's fields, the one flatten
(lib/transform.py), validation (lib/quality.py), the table's DDL, migration and casts
(lib/db_schema.py, lib/db_load.py), the file formats' types (lib/formats.py) and the contract table
in docs/data-model.md (`python -m lib.contract` prints it).

To add a column: append a `Column` (nullable, so that existing tables are migrated by the next load
with `ALTER TABLE … ADD COLUMN`), regenerate the docs table, and raise the minor version. A column
derived from fields already fetched (a count, a first element) needs nothing else. A column from a
new source field cannot be added while all `MAX_SOURCE_FIELDS` fields are requested: the live API
refuses an 11th (HTTP 400). It would take a second request for the other fields (a second URL,
ingested and joined by key), or dropping a field no column needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

VERSION = "1.1.0"
KEY = "name_common"
REGIONS = ("Africa", "Americas", "Antarctic", "Asia", "Europe", "Oceania")
MAX_SOURCE_FIELDS = 10  # the live API answers more fields in `fields` with HTTP 400
API_BASE = "https://restcountries.com/v3.1/all"


@dataclass(frozen=True)
class Kind:
    """A column's type, as each place that stores it spells it."""

    name: str
    sql: str  # PostgreSQL
    arrow: str  # pyarrow: "string", "int64", "float64", or "list<string>"
    pandas: str  # the dtype of a typed frame's column
    is_list: bool = False


KINDS = {k.name: k for k in (
    Kind("text", sql="text", arrow="string", pandas="object"),
    Kind("text[]", sql="text[]", arrow="list<string>", pandas="object", is_list=True),
    Kind("bigint", sql="bigint", arrow="int64", pandas="int64"),
    Kind("double", sql="double precision", arrow="float64", pandas="float64"),
)}


@dataclass(frozen=True)
class Rule:
    """What every value of a column must be. lib/quality.py checks it by `name`; `reason` is what a
    quarantined record is told ({column} is the column's name); `sql` is the table's CHECK, if any."""

    name: str
    reason: str
    sql: str | None = None


RULES = {r.name: r for r in (
    Rule("text", "{column} must be non-empty text"),
    Rule("text list", "{column} must be a list of strings"),
    Rule("count", "{column} must be a whole number >= 0", sql="{column} >= 0"),
    Rule("measure", "{column} must be a number >= 0", sql="{column} >= 0"),
    Rule("region", "{column} must be one of " + ", ".join(REGIONS)),
    Rule("timezones", "{column} must be a non-empty list shaped UTC±HH:MM"),
    Rule("web url", "{column} must be an http(s) URL with a host"),
)}
DEFAULT_RULES = {"text": "text", "text[]": "text list", "bigint": "count", "double": "measure"}


@dataclass(frozen=True)
class Source:
    """Where a column's value comes from: the REST Countries field it reads, how (for the docs), and
    `read(record)`. Values are kept as found (the rules judge them); only the nesting is undone, an
    empty text becomes null and a mapping's codes are sorted for a stable order."""

    field: str
    how: str
    read: Callable[[dict], Any]


def _blank_to_none(value):
    return None if value == "" else value


def _member(value, key):
    return value.get(key) if isinstance(value, dict) else None


def text(field: str, key: str | None = None) -> Source:
    """A text: the field itself, or one key of it (`name.common`)."""
    if key is None:
        return Source(field, f"`{field}`", lambda r: _blank_to_none(r.get(field)))
    return Source(field, f"`{field}.{key}`", lambda r: _blank_to_none(_member(r.get(field), key)))


def value(field: str, missing=None) -> Source:
    """The field as found (`missing` when the record lacks it)."""
    return Source(field, f"`{field}`", lambda r: r.get(field, missing))


def codes(field: str) -> Source:
    """A mapping's keys, sorted (a value that is not a mapping is kept for the rules to judge)."""
    def read(record):
        found = record.get(field)
        if isinstance(found, dict):
            return sorted(found)
        return [] if found is None else found
    return Source(field, f"`{field}` keys, sorted", read)


def values(field: str, key: str | None = None) -> Source:
    """A mapping's values (or one key of each) in the order of its sorted keys."""
    def read(record):
        found = record.get(field)
        if isinstance(found, dict):
            return [found[c] if key is None else _member(found[c], key) for c in sorted(found)]
        return [] if found is None else found
    how = f"`{field}` values" if key is None else f"`{field}.*.{key}`"
    return Source(field, f"{how}, in key order", read)


def derived(field: str, how: str, read: Callable[[dict], Any]) -> Source:
    """A value computed from a field already fetched (`how` says how, for the docs)."""
    return Source(field, how, read)


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # a key of KINDS
    nullable: bool
    description: str
    source: Source
    rule: str = ""  # a key of RULES; empty: the kind's default rule

    @property
    def type(self) -> Kind:
        return KINDS[self.kind]

    @property
    def dtype(self) -> str:
        """Its pandas dtype in a typed frame (a nullable whole number: pandas' Int64, which holds nulls)."""
        return "Int64" if self.nullable and self.kind == "bigint" else self.type.pandas

    @property
    def check(self) -> Rule:
        return RULES[self.rule or DEFAULT_RULES[self.kind]]

    @property
    def reason(self) -> str:
        return self.check.reason.format(column=self.name)


CONTRACT = (
    Column("name_common", "text", False, "common English name; the key: non-empty, unique", text("name", "common")),
    Column("name_official", "text", False, "official English name, non-empty", text("name", "official")),
    Column("capital", "text[]", False, "capital cities, source order (empty for Antarctica, Macau, …)",
           value("capital", [])),
    Column("population", "bigint", False, "population, >= 0", value("population")),
    Column("area", "double", False, "area in km², >= 0", value("area")),
    Column("region", "text", False, "one of " + ", ".join(REGIONS), text("region"), rule="region"),
    Column("subregion", "text", True, "null where the source has an empty one", text("subregion")),
    Column("language_codes", "text[]", False, "ISO 639-3 codes, sorted", codes("languages")),
    Column("language_names", "text[]", False, "language names, in code order", values("languages")),
    Column("currency_codes", "text[]", False, "ISO 4217 codes, sorted", codes("currencies")),
    Column("currency_names", "text[]", False, "currency names, in code order", values("currencies", "name")),
    Column("flag_png", "text", True, "http(s) URL of the PNG flag", text("flags", "png"), rule="web url"),
    Column("flag_svg", "text", True, "http(s) URL of the SVG flag", text("flags", "svg"), rule="web url"),
    Column("flag_alt", "text", True, "text description of the flag", text("flags", "alt")),
    Column("timezones", "text[]", False, "UTC offsets shaped UTC±HH:MM (or UTC), at least one",
           value("timezones", []), rule="timezones"),
)
COLUMNS = [c.name for c in CONTRACT]
LIST_COLUMNS = [c.name for c in CONTRACT if c.type.is_list]
TEXT_COLUMNS = [c.name for c in CONTRACT if c.kind == "text"]
TYPED_COLUMNS = [c.name for c in CONTRACT if c.type.pandas != "object"]  # numbers: cast when read back
# The REST Countries fields the columns read, in the order the columns first read them.
SOURCE_FIELDS = tuple(dict.fromkeys(c.source.field for c in CONTRACT))

if len(SOURCE_FIELDS) > MAX_SOURCE_FIELDS:
    raise RuntimeError(f"the contract reads {len(SOURCE_FIELDS)} source fields; the live API answers more "
                       f"than {MAX_SOURCE_FIELDS} with HTTP 400 (see this module's docstring)")


def api_url(base: str = API_BASE) -> str:
    """The API URL asking for exactly the contract's source fields."""
    return f"{base}?fields={','.join(SOURCE_FIELDS)}"


def column(name: str) -> Column:
    for c in CONTRACT:
        if c.name == name:
            return c
    raise KeyError(name)


def table_rows() -> list[dict]:
    """The contract as rows (column, type, nullable, source, rule), for notebooks and the docs."""
    return [{"column": c.name, "type": c.kind, "nullable": c.nullable, "source": c.source.how,
             "rule": c.description} for c in CONTRACT]


def markdown_table() -> str:
    """The contract as the Markdown table in docs/data-model.md (a test keeps the two equal)."""
    lines = ["| column | type | nullable | from the source record | rule |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| `{r['column']}` | {r['type']} | {'yes' if r['nullable'] else 'no'} | {r['source']} | {r['rule']} |"
              for r in table_rows()]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m lib.contract: the table for docs/data-model.md
    print(markdown_table())
