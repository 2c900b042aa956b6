"""lib.db_schema against the real embedded PostgreSQL: the tables' names, the load log and tables
migrated to the contract, or refused."""

from __future__ import annotations

import pytest
from psycopg2 import sql

from lib import db, db_load, db_read
from lib.contract import KEY
from lib.db_load import MergeOptions
from lib.names import InvalidName
from tests.db_helpers import SCHEMA, csv, current, dump, load


def test_a_table_whose_history_table_name_would_be_too_long_is_refused(pg, clean):
    with pytest.raises(InvalidName, match="history table name"):
        db_load.merge(pg, csv(clean.head(1)), MergeOptions(schema=SCHEMA, table="t" * 60, run_id="r1"))
    assert not db.table_exists(pg, SCHEMA, "t" * 60)


def test_a_load_log_from_before_load_ids_is_migrated(pg, clean, unique):
    schema, table = f"old_{unique}", f"t_{unique}"
    with pg.cursor() as cur:  # the load log as earlier versions created it
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        cur.execute(sql.SQL(
            "CREATE TABLE {} (run_id text NOT NULL, table_name text NOT NULL, loaded_at timestamptz NOT NULL, "
            "mode text NOT NULL, inserted integer NOT NULL, updated integer NOT NULL, unchanged integer NOT NULL, "
            "retired integer NOT NULL, PRIMARY KEY (run_id, table_name))").format(
            sql.Identifier(schema, "pipeline_loads")))
        cur.execute(sql.SQL("INSERT INTO {} VALUES ('b', 'x', '2026-01-02', 'upsert', 1, 0, 0, 0), "
                            "('a', 'x', '2026-01-01', 'upsert', 1, 0, 0, 0)").format(
            sql.Identifier(schema, "pipeline_loads")))
    db_load.merge(pg, csv(clean.head(3)), MergeOptions(schema=schema, table=table, run_id="r1"))
    db_load.merge(pg, csv(clean.head(3)), MergeOptions(schema=schema, table=table, run_id="r1"))
    loads = db_read.read_frame(pg, sql.SQL("SELECT load_id, run_id FROM {} ORDER BY load_id").format(
        sql.Identifier(schema, "pipeline_loads")))
    assert loads.values.tolist() == [[1, "a"], [2, "b"], [3, "r1"], [4, "r1"]]
    assert len(db_read.as_of(pg, schema, table, "r1")) == 3


# --- migrating an existing table to the contract -----------------------------------------------------

def alter(pg, table, statement: str) -> None:
    """Run an ALTER TABLE on the table and its history, as an older or hand-edited schema would have."""
    with pg.cursor() as cur:
        for name in (table, f"{table}_history"):
            cur.execute(sql.SQL(statement).format(t=db.ident(SCHEMA, name)))


def test_a_nullable_contract_column_missing_from_an_existing_table_is_added_by_the_load(pg, clean, table):
    load(pg, csv(clean.head(5)), table, "r1")
    alter(pg, table, "ALTER TABLE {t} DROP COLUMN flag_alt")  # a table made before the column existed
    result = load(pg, csv(clean.head(6)), table, "r2")
    assert result["inserted"] == 1 and result["current_rows"] == 6
    got = current(pg, table)
    newest = clean.iloc[5]
    assert got.at[newest[KEY], "flag_alt"] == newest["flag_alt"]
    with pg.cursor() as cur:
        cur.execute("SELECT count(*) FROM information_schema.columns WHERE table_name IN (%s, %s) "
                    "AND column_name = 'flag_alt'", (table, f"{table}_history"))
        assert cur.fetchone()[0] == 2


@pytest.mark.parametrize("statement, problem", [
    ("ALTER TABLE {t} DROP COLUMN region", r"column region \(text NOT NULL\) is in the contract but not in"),
    ("ALTER TABLE {t} ALTER COLUMN population TYPE integer", "population of .* is integer, the contract says bigint"),
    ("ALTER TABLE {t} ALTER COLUMN name_official DROP NOT NULL", "name_official of .* is nullable, the contract says NOT NULL"),
    ("ALTER TABLE {t} ADD COLUMN extra text", "column extra of .* is not in the contract: drop it"),
])
def test_any_other_difference_from_the_contract_is_refused_and_nothing_is_loaded(pg, clean, table, statement,
                                                                                  problem):
    load(pg, csv(clean.head(5)), table, "r1")
    alter(pg, table, statement)
    before = dump(pg, table)
    with pytest.raises(db.ContractMismatch, match=f"does not match the silver contract; nothing was loaded: .*{problem}"):
        load(pg, csv(clean.head(6)), table, "r2")
    assert dump(pg, table) == before
