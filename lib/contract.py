"""The silver contract, declared once: its version, its columns, the key, and the source fields they
come from. The API URL's default fields, the PostgreSQL DDL, the export query, validation and the
contract table in docs/data-model.md are all derived from here.

To add a column: append a `Column` (nullable, so existing tables can be migrated by the load with
`ALTER TABLE … ADD COLUMN`), fill it in `transform.flatten_record`, and raise the minor version.
"""

from __future__ import annotations

from dataclasses import dataclass

VERSION = "1.0.0"
KEY = "name_common"
REGIONS = ("Africa", "Americas", "Antarctic", "Asia", "Europe", "Oceania")
# The REST Countries fields the contract is built from; the live API accepts at most 10 in `fields`.
SOURCE_FIELDS = ("name", "capital", "population", "region", "subregion", "languages", "currencies",
                 "flags", "area", "timezones")
MAX_SOURCE_FIELDS = 10
API_BASE = "https://restcountries.com/v3.1/all"


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # text, text[], bigint, double
    nullable: bool
    description: str


CONTRACT = (
    Column("name_common", "text", False, "common English name; the key: non-empty, unique"),
    Column("name_official", "text", False, "official English name, non-empty"),
    Column("capital", "text[]", False, "capital cities, source order (empty for Antarctica, Macau, …)"),
    Column("population", "bigint", False, "population, >= 0"),
    Column("area", "double", False, "area in km², >= 0"),
    Column("region", "text", False, "one of " + ", ".join(REGIONS)),
    Column("subregion", "text", True, "null where the source has an empty one"),
    Column("language_codes", "text[]", False, "ISO 639-3 codes, sorted"),
    Column("language_names", "text[]", False, "language names, in code order"),
    Column("currency_codes", "text[]", False, "ISO 4217 codes, sorted"),
    Column("currency_names", "text[]", False, "currency names, in code order"),
    Column("flag_png", "text", True, "URL of the PNG flag"),
    Column("flag_svg", "text", True, "URL of the SVG flag"),
    Column("flag_alt", "text", True, "text description of the flag"),
    Column("timezones", "text[]", False, "UTC offsets shaped UTC±HH:MM (or UTC), at least one"),
)
COLUMNS = [c.name for c in CONTRACT]
LIST_COLUMNS = [c.name for c in CONTRACT if c.kind == "text[]"]
TEXT_COLUMNS = [c.name for c in CONTRACT if c.kind == "text"]
# How each kind is stored in PostgreSQL (the table DDL and the migration compare against this).
SQL_TYPES = {"text": "text", "text[]": "text[]", "bigint": "bigint", "double": "double precision"}

assert len(SOURCE_FIELDS) <= MAX_SOURCE_FIELDS, "the live API refuses more than 10 fields"


def api_url(base: str = API_BASE) -> str:
    """The API URL asking for exactly the contract's source fields."""
    return f"{base}?fields={','.join(SOURCE_FIELDS)}"


def column(name: str) -> Column:
    for c in CONTRACT:
        if c.name == name:
            return c
    raise KeyError(name)


def table_rows() -> list[dict]:
    """The contract as rows (column, type, nullable, rule), for notebooks and the docs."""
    return [{"column": c.name, "type": c.kind, "nullable": c.nullable, "rule": c.description} for c in CONTRACT]


def markdown_table() -> str:
    """The contract as the Markdown table in docs/data-model.md (a test keeps the two equal)."""
    lines = ["| column | type | nullable | rule |", "| --- | --- | --- | --- |"]
    lines += [f"| `{c.name}` | {c.kind} | {'yes' if c.nullable else 'no'} | {c.description} |" for c in CONTRACT]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m lib.contract: the table for docs/data-model.md
    print(markdown_table())
