"""Hashes PostgreSQL computes next to the data: a row's `quality.row_hash` (the load's proof reads
back only the rows where it cannot be sure) and a table's checksum (the publish's proof that the
table holds exactly the rows a run staged)."""

from __future__ import annotations

from psycopg2 import sql

from lib.contract import CONTRACT

# `quality.row_hash` is sha256 of the row's values as json.dumps(values, ensure_ascii=False) writes
# them. PostgreSQL writes the same text: a text as JSON (to_jsonb, only when it holds a character JSON
# escapes), a list as a JSON array with ", " between its items, a whole number as itself and a double
# as Python's repr (PostgreSQL's shortest exact digits, with ".0" for a whole one and positional
# notation up to 1e16). Where the two could still differ (the rare double whose shortest digits the
# two round differently), the row's hash is recomputed in Python from the row read back: the SQL hash
# is a fast path, never the proof's last word.
_ESCAPED = sql.SQL(r"""'[\x01-\x1f"\\]'""")


def _json_sql(c, ref: sql.Composable) -> sql.Composable:
    """One contract column's value as `quality.row_hash` writes it, in SQL."""
    if c.kind == "text[]":
        body = sql.SQL("CASE WHEN cardinality({v}) = 0 THEN '[]' WHEN array_position({v}, NULL) IS NOT NULL "
                       "OR array_to_string({v}, '') ~ {e} THEN to_jsonb({v})::text "
                       """ELSE '["' || array_to_string({v}, '", "') || '"]' END""")
    elif c.kind == "bigint":
        body = sql.SQL("{v}::text")
    elif c.kind == "double":
        body = sql.SQL("CASE WHEN {v}::text ~ '^-?[0-9]+$' THEN {v}::text || '.0' "
                       r"WHEN {v}::text ~ 'e\+15$' THEN ({v}::text::numeric)::text || "
                       "CASE WHEN strpos(({v}::text::numeric)::text, '.') > 0 THEN '' ELSE '.0' END "
                       "ELSE {v}::text END")
    else:
        body = sql.SQL("""CASE WHEN {v} ~ {e} THEN to_jsonb({v})::text ELSE '"' || {v} || '"' END""")
    return sql.SQL("coalesce({}, 'null')").format(body.format(v=ref, e=_ESCAPED))


def row_hash(prefix: str) -> sql.Composable:
    """`quality.row_hash` of a row of `prefix` (a table alias), computed by PostgreSQL."""
    text = sql.SQL(" || ', ' || ").join(_json_sql(c, sql.Identifier(prefix, c.name)) for c in CONTRACT)
    return sql.SQL("encode(sha256(convert_to('[' || {} || ']', 'UTF8')), 'hex')").format(text)


def checksum(cur, table: sql.Identifier) -> str:
    """"rows:sum" of a table's contract columns and _row_hash, hashed by PostgreSQL row by row
    (hash_record_extended; a double by its bits: -0.0 is not 0.0): equal for two tables holding the
    same rows in any order, without reading them out."""
    values = sql.SQL(", ").join(
        (sql.SQL("float8send({})") if c.kind == "double" else sql.SQL("{}")).format(sql.Identifier(c.name))
        for c in CONTRACT)
    cur.execute(sql.SQL("SELECT count(*) || ':' || coalesce(sum(hash_record_extended(ROW({}, _row_hash), 0)::numeric), 0) "
                        "FROM {}").format(values, table))
    return cur.fetchone()[0]
