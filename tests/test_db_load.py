"""lib.db_load against the real embedded PostgreSQL: loads with history, the proof before the commit,
rollback, and COPY through a pipe."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from psycopg2 import sql

from lib import contract, db, db_hash, db_load, db_pipes, db_read, db_schema, formats, quality
from lib.contract import COLUMNS, KEY
from lib.db import DatabaseError
from lib.db_load import MergeOptions
from lib.names import InvalidName
from tests.db_helpers import SCHEMA, changed, csv, current, dump, history, load


# --- upsert ------------------------------------------------------------------------------------------

def test_upsert_inserts_then_a_rerun_changes_nothing(pg, clean, table):
    batch = clean.head(5)
    first = load(pg, csv(batch), table, "r1")
    assert first == {"inserted": 5, "updated": 0, "unchanged": 0, "retired": 0, "current_rows": 5,
                     "mode": "upsert"}
    before = dump(pg, table)
    second = load(pg, csv(batch), table, "r2")
    assert (second["inserted"], second["updated"], second["unchanged"]) == (0, 0, 5)
    assert len(history(pg, table)) == 5
    assert set(current(pg, table)["_run_id"]) == {"r1"}
    assert dump(pg, table).split(b"[(")[0] == before.split(b"[(")[0]  # rows untouched, only the load log grew


def indexes(pg, table) -> dict[str, list[tuple[str, str]]]:
    """Each table's primary key and indexes: (name, definition) as PostgreSQL prints them."""
    out = {}
    for name in (table, f"{table}_history"):
        with pg.cursor() as cur:
            cur.execute("SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indexrelid::int FROM pg_index i "
                        "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = to_regclass(%s) ORDER BY 1",
                        (db.ident(SCHEMA, name).as_string(cur),))
            out[name] = cur.fetchall()
    return out


def test_a_first_load_builds_its_keys_after_the_rows_and_a_table_made_before_keeps_its_own(pg, clean, table,
                                                                                          monkeypatch):
    """A load that creates its tables builds their primary keys and indexes once the rows are in;
    they come out as the DDL makes them, and the next load finds them. An empty table created
    beforehand (by another transaction) keeps its indexes as they are."""
    deferred = []
    drop = db_load._drop_indexes
    monkeypatch.setattr(db_load, "_drop_indexes", lambda cur, tables: deferred.append(
        [t.as_string(cur) for t in tables]) or drop(cur, tables))
    before = f"{table}_made_before"
    with db.transaction(pg), pg.cursor() as cur:
        db_schema.ensure_tables(cur, SCHEMA, before)
    made = indexes(pg, before)
    assert load(pg, csv(clean.head(5)), before, "r1")["inserted"] == 5
    assert indexes(pg, before) == made  # the same index objects: not dropped and built again

    assert load(pg, csv(clean.head(5)), table, "r1")["inserted"] == 5
    assert deferred == [[], [f'"{SCHEMA}"."{table}"', f'"{SCHEMA}"."{table}_history"']]
    built = indexes(pg, table)
    strip = [[(n.replace(before, "T"), d.replace(before, "T")) for n, d, _ in v] for v in made.values()]
    assert [[(n.replace(table, "T"), d.replace(table, "T")) for n, d, _ in v] for v in built.values()] == strip
    assert [n for n, _, _ in built[table]] == [f"{table}_pkey"]
    # The key is there: a second batch updates through it (ON CONFLICT) and the history's current
    # version is unique again.
    result = load(pg, csv(changed(clean.head(5), 1, population=7)), table, "r2")
    assert (result["inserted"], result["updated"], result["unchanged"]) == (0, 1, 4)
    assert history(pg, table)["is_current"].sum() == 5
    assert deferred[-1] == []


def test_a_first_load_with_a_key_twice_is_rolled_back_and_names_the_key(pg, clean, table):
    batch = pd.concat([clean.head(3), clean.head(1)], ignore_index=True)
    with pytest.raises(DatabaseError, match=rf"rolled back: .*\({KEY}\)=\({batch.at[0, KEY]}\) is duplicated"):
        load(pg, csv(batch), table, "r1")
    assert not db.table_exists(pg, SCHEMA, table)


def test_a_changed_row_closes_the_old_version_and_opens_a_new_one(pg, clean, table):
    batch = clean.head(5)
    key = batch.at[2, KEY]
    load(pg, csv(batch), table, "r1")
    result = load(pg, csv(changed(batch, 2, population=123)), table, "r2")
    assert (result["inserted"], result["updated"], result["unchanged"]) == (0, 1, 4)
    now = current(pg, table)
    assert now.at[key, "population"] == 123 and now.at[key, "_run_id"] == "r2"
    assert (now.drop(index=key)["_run_id"] == "r1").all()
    versions = history(pg, table)
    versions = versions[versions[KEY] == key]
    assert list(versions["population"]) == [batch.at[2, "population"], 123]
    assert list(versions["is_current"]) == [False, True]
    assert pd.notna(versions["valid_to"].iloc[0]) and pd.isna(versions["valid_to"].iloc[1])
    assert len(history(pg, table)) == 6


def test_retire_missing_removes_an_absent_key_and_closes_its_history(pg, clean, table):
    batch = clean.head(5)
    gone = batch.at[4, KEY]
    load(pg, csv(batch), table, "r1")
    result = load(pg, csv(batch.head(4)), table, "r2")
    assert result["retired"] == 1 and result["current_rows"] == 4
    assert gone not in current(pg, table).index
    versions = history(pg, table)
    row = versions[versions[KEY] == gone].iloc[0]
    assert not row["is_current"] and pd.notna(row["valid_to"])


def test_without_retire_missing_an_absent_key_stays(pg, clean, table):
    load(pg, csv(clean.head(5)), table, "r1")
    result = load(pg, csv(clean.head(4)), table, "r2", retire_missing=False)
    assert result["retired"] == 0 and result["current_rows"] == 5


# --- append and replace ------------------------------------------------------------------------------

def test_append_only_inserts_new_keys_and_never_updates_or_removes(pg, clean, table):
    load(pg, csv(clean.head(5)), table, "r1")
    before = current(pg, table)
    batch = clean.iloc[3:8].reset_index(drop=True)  # keys 3-4 already there (same values), 5-7 new
    result = load(pg, csv(batch), table, "r2", mode="append", full=True)
    assert (result["inserted"], result["updated"], result["unchanged"], result["retired"]) == (3, 0, 2, 0)
    assert result["batch_rows"] == 5 and result["batch_fingerprint"] == quality.fingerprint(batch)["fingerprint"]
    after = current(pg, table)
    assert len(after) == 8
    assert after.loc[before.index].equals(before)  # the five earlier rows exactly as they were
    assert len(history(pg, table)) == 8


def test_append_refuses_a_batch_whose_existing_keys_hold_other_values(pg, clean, table):
    load(pg, csv(clean.head(5)), table, "r1")
    before = dump(pg, table)
    batch = changed(clean.iloc[3:8].reset_index(drop=True), 0, population=1)  # key 3 changed
    with pytest.raises(db.BatchMismatch, match=f"append mode keeps existing rows.*{clean.at[3, KEY]!r}.*upsert"):
        load(pg, csv(batch), table, "r2", mode="append")
    assert dump(pg, table) == before  # nothing inserted either


def test_replace_makes_the_table_the_batch_and_keeps_unchanged_rows_audit_columns(pg, clean, table):
    load(pg, csv(clean.head(5)), table, "r1")
    batch = clean.iloc[2:7].reset_index(drop=True)
    result = load(pg, csv(batch), table, "r2", mode="replace", retire_missing=False)
    assert (result["inserted"], result["unchanged"], result["retired"]) == (2, 3, 2)
    after = current(pg, table)
    assert sorted(after.index) == sorted(batch[KEY])
    # Unchanged rows keep their audit columns: _run_id is the run that last changed the row.
    assert after["_run_id"].to_dict() == {k: ("r1" if k in set(clean[KEY].head(5)) else "r2") for k in batch[KEY]}
    versions = history(pg, table)
    assert versions["is_current"].sum() == 5 and len(versions) == 7


# --- proof inside the transaction, drift, rewinds ----------------------------------------------------

def test_a_batch_that_is_not_the_silver_table_is_rolled_back(pg, clean, table):
    load(pg, csv(clean.head(5)), table, "r1")
    before = dump(pg, table)
    silver = quality.fingerprint(clean.head(5))["fingerprint"]
    edited = changed(clean.head(5), 1, name_official="Edited between stages")  # what stage 3 read
    with pytest.raises(db.BatchMismatch, match="the silver record says .*rolled back"):
        load(pg, csv(edited), table, "r2", expected_fingerprint=silver)
    assert dump(pg, table) == before
    result = load(pg, csv(clean.head(5)), table, "r2", expected_fingerprint=silver, full=True)
    assert result["batch_fingerprint"] == silver


@pytest.mark.parametrize("mode", ["upsert", "replace"])
def test_a_row_changed_behind_the_pipelines_back_is_repaired_and_reported(pg, clean, table, mode):
    batch = clean.head(5)
    load(pg, csv(batch), table, "r1")
    victim = batch.at[2, KEY]
    with pg.cursor() as cur:  # an edit outside the pipeline: values change, _row_hash stays
        cur.execute(sql.SQL("UPDATE {} SET population = population + 7, capital = ARRAY['Elsewhere'] "
                            "WHERE {} = %s").format(db.ident(SCHEMA, table), sql.Identifier(KEY)), (victim,))
    result = load(pg, csv(batch), table, "r2", mode=mode, full=True,
                  expected_fingerprint=quality.fingerprint(batch)["fingerprint"])
    assert result["drift"] == {"rows": 1, "keys": [victim], "repaired": 1}
    if mode == "upsert":
        assert (result["updated"], result["unchanged"]) == (1, 4)
    after = current(pg, table)
    assert quality.fingerprint(after.reset_index())["fingerprint"] == quality.fingerprint(batch)["fingerprint"]
    assert after.at[victim, "population"] == batch.at[2, "population"]
    with pg.cursor() as cur:
        cur.execute(sql.SQL("SELECT repaired FROM {} WHERE table_name = %s AND run_id = 'r2'").format(
            db.ident(SCHEMA, "pipeline_loads")), (table,))
        assert cur.fetchone()[0] == 1


def test_a_stored_row_whose_values_do_not_give_its_hash_is_drift_even_when_the_batch_carries_that_hash(pg, clean, table):
    """The row equals the batch in values and _row_hash, but that hash is not its values' hash: drift,
    found by the read-back after the write (as a row that differs is found before it)."""
    batch = clean.head(3).copy()
    batch["_row_hash"] = quality.row_hashes(batch)
    victim = batch.at[1, KEY]
    batch.at[1, "_row_hash"] = "0" * 64
    data = formats.csv_encode(batch[COLUMNS + ["_row_hash"]])
    first = load(pg, data, table, "r1", full=True)
    assert first["drift"] == {"rows": 0, "keys": [], "repaired": 0}  # a new row is not drift
    again = load(pg, data, table, "r2", full=True)
    assert (again["unchanged"], again["drift"]) == (3, {"rows": 1, "keys": [victim], "repaired": 1})


def test_older_data_is_refused_over_newer_unless_allowed_and_every_load_has_its_own_row(pg, clean, table):
    load(pg, csv(clean.head(5)), table, "r-old", data_as_of="2026-01-01T00:00:00+00:00")
    newer = changed(clean.head(5), 0, population=5)
    load(pg, csv(newer), table, "r-new", data_as_of="2026-02-01T00:00:00+00:00")
    before = dump(pg, table)
    with pytest.raises(db.RewindRefused, match="run r-old's data .* is older .*r-new.*allow_rewind=true"):
        load(pg, csv(clean.head(5)), table, "r-old", data_as_of="2026-01-01T00:00:00+00:00")
    assert dump(pg, table) == before
    result = load(pg, csv(clean.head(5)), table, "r-old", data_as_of="2026-01-01T00:00:00+00:00",
                  allow_rewind=True, full=True)
    assert result["updated"] == 1
    loads = db_read.read_frame(pg, sql.SQL("SELECT load_id, run_id FROM {} WHERE table_name = %s "
                                           "ORDER BY load_id").format(db.ident(SCHEMA, "pipeline_loads")), (table,))
    assert loads["run_id"].tolist() == ["r-old", "r-new", "r-old"] and loads["load_id"].is_unique
    # as_of a run that loaded twice: the table after its latest load (the rewind).
    assert db_read.as_of(pg, SCHEMA, table, "r-old").set_index(KEY).at[clean.at[0, KEY], "population"] == \
        clean.at[0, "population"]
    assert db_read.as_of(pg, SCHEMA, table, "r-new").set_index(KEY).at[clean.at[0, KEY], "population"] == 5


# --- staged by stage 3, merged once by the publish ---------------------------------------------------

def staged_rows(pg, staged, table) -> pd.DataFrame:
    return db_read.current(pg, staged, table).set_index(KEY).drop(columns=["_loaded_at"])


def history_shape(frame: pd.DataFrame) -> list[tuple]:
    """A history's versions as (key, population, _run_id, closed, is_current), sorted."""
    return sorted((r[KEY], r["population"], r["_run_id"], pd.notna(r["valid_to"]), bool(r["is_current"]))
                  for _, r in frame.iterrows())


def test_a_staged_load_is_the_merge_to_come_and_the_publish_merges_it_once(pg, clean, table, unique):
    """Stage 3's half: the published tables are only read; the staged table is the table the run will
    publish (a changed row, a new one, a retired one, a held one, unchanged rows with their audit
    columns), its history and load log as they will be; the publish's merge makes the table exactly
    that, proven by the staged checksum instead of a read-back."""
    load(pg, csv(clean.head(6)), table, "r1")
    before = dump(pg, table)
    batch = changed(clean.iloc[[0, 1, 2, 3, 6]].reset_index(drop=True), 1, population=123)  # 4 gone, 5 held
    held = clean.at[5, KEY]
    staged = f"stage_{unique}"
    with db.transaction(pg), pg.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(db.ident(staged)))
    options = MergeOptions(schema=SCHEMA, table=table, run_id="r2", held=(held,),
                           expected_fingerprint=quality.fingerprint(batch)["fingerprint"])
    result = db_load.stage(pg, csv(batch), options, staged)
    assert dump(pg, table) == before  # consumers' tables untouched
    assert {k: result[k] for k in ("inserted", "updated", "unchanged", "retired", "held", "current_rows")} == \
        {"inserted": 1, "updated": 1, "unchanged": 3, "retired": 1, "held": 1, "current_rows": 6}
    rows = staged_rows(pg, staged, table)
    assert sorted(rows.index) == sorted([*batch[KEY], held])
    assert rows.at[batch.at[1, KEY], "population"] == 123
    assert rows["_run_id"].to_dict() == {k: "r2" if k in (batch.at[1, KEY], batch.at[4, KEY]) else "r1" for k in rows.index}
    planned_history = db_read.read_frame(pg, db_read.history_after(pg, SCHEMA, table, staged))
    with pg.cursor() as cur:
        cur.execute(sql.SQL("SELECT run_id, inserted, updated, retired FROM {} WHERE table_name = %s "
                            "ORDER BY load_id").format(db.ident(staged, "pipeline_loads")), (table,))
        planned_loads = cur.fetchall()

    published = db_load.merge(pg, db_load.TableSource(staged, table), MergeOptions(
        schema=SCHEMA, table=table, run_id="r2", mode="replace", expected_fingerprint=result["current_fingerprint"],
        proven_checksum=result["checksum"]))
    assert (published["current_fingerprint"], published["current_rows"]) == (result["current_fingerprint"], 6)
    assert {k: published[k] for k in ("inserted", "updated", "retired")} == \
        {k: result[k] for k in ("inserted", "updated", "retired")}
    assert published["unchanged"] == result["unchanged"] + result["held"]  # a held row stays as it is
    pd.testing.assert_frame_equal(current(pg, table).drop(columns=["_loaded_at"]).sort_index(), rows.sort_index())
    assert history_shape(history(pg, table)) == history_shape(planned_history)
    with pg.cursor() as cur:
        cur.execute(sql.SQL("SELECT run_id, inserted, updated, retired FROM {} WHERE table_name = %s "
                            "ORDER BY load_id").format(db.ident(SCHEMA, "pipeline_loads")), (table,))
        assert cur.fetchall() == planned_loads


def test_a_publish_refuses_a_staged_table_edited_after_its_proof(pg, clean, table, unique):
    staged = f"stage_{unique}"
    with db.transaction(pg), pg.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(db.ident(staged)))
    batch = clean.head(5)
    result = db_load.stage(pg, csv(batch), MergeOptions(schema=SCHEMA, table=table, run_id="r1"), staged)
    assert not db.table_exists(pg, SCHEMA, table)
    with pg.cursor() as cur:  # -0.0 for 0.0 would do as well: a double is checked by its bits
        cur.execute(sql.SQL("UPDATE {} SET area = area + 1 WHERE {} = %s").format(
            db.ident(staged, table), sql.Identifier(KEY)), (batch.at[3, KEY],))
    with pytest.raises(db.BatchMismatch, match="rolled back"):
        db_load.merge(pg, db_load.TableSource(staged, table), MergeOptions(
            schema=SCHEMA, table=table, run_id="r1", mode="replace",
            expected_fingerprint=result["current_fingerprint"], proven_checksum=result["checksum"]))
    assert not db.table_exists(pg, SCHEMA, table)


def acl(pg, schema, name) -> list[tuple]:
    """A table's privileges as (grantee, privilege, grantable), sorted (PUBLIC: grantee 0)."""
    with pg.cursor() as cur:
        cur.execute("SELECT a.grantee::int, a.privilege_type, a.is_grantable FROM pg_class c "
                    "CROSS JOIN aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a "
                    "WHERE c.oid = to_regclass(%s) ORDER BY 1, 2", (db.ident(schema, name).as_string(cur),))
        return cur.fetchall()


@pytest.mark.parametrize("taken", [False, True], ids=["adopted", "index-name-taken"])
def test_a_first_publish_makes_the_staged_table_the_table_as_if_created_there(pg, clean, table, unique, taken):
    """The table a first load publishes is its proven staged table itself, moved: no column default,
    the rows and key as staged, the history written from it, and the privileges the schema's
    default privileges give a table made there. When an index name of it is taken in the schema,
    its rows are copied instead, with the same result."""
    schema, staged = f"pub_{unique}", f"stage_{unique}"
    with db.transaction(pg), pg.cursor() as cur:
        for name in (schema, staged):
            cur.execute(sql.SQL("CREATE SCHEMA {}").format(db.ident(name)))
        cur.execute(sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA {} GRANT SELECT, REFERENCES ON TABLES TO PUBLIC").format(
            db.ident(schema)))
        db_schema.create_table(cur, schema, "made_there")  # what a table made in the schema gets
        if taken:
            cur.execute(sql.SQL("CREATE TABLE {} (x int)").format(db.ident(schema, f"{table}_pkey")))
    batch, literals = clean.head(6), io.BytesIO()  # the stage's path: COPY straight into the staged table
    formats.copy_csv(formats.get("parquet").encode(batch), "parquet", literals)
    result = db_load.stage(pg, literals.getvalue(), MergeOptions(schema=schema, table=table, run_id="r1", lists="array",
                                                        expected_fingerprint=quality.fingerprint(batch)["fingerprint"]),
                           staged)
    rows = staged_rows(pg, staged, table)
    with pg.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)::oid::int", (db.ident(staged, table).as_string(cur),))
        staged_oid = cur.fetchone()[0]
    pg.rollback()
    published = db_load.merge(pg, db_load.TableSource(staged, table), MergeOptions(
        schema=schema, table=table, run_id="r1", mode="replace", expected_fingerprint=result["current_fingerprint"],
        proven_checksum=result["checksum"]))
    assert (published["inserted"], published["current_rows"]) == (6, 6)
    assert db.table_exists(pg, staged, table) is taken  # moved, or copied from where it stays
    with pg.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)::oid::int", (db.ident(schema, table).as_string(cur),))
        assert (cur.fetchone()[0] == staged_oid) is not taken
        cur.execute("SELECT count(*) FROM pg_attrdef WHERE adrelid = to_regclass(%s)",
                    (db.ident(schema, table).as_string(cur),))
        assert cur.fetchone()[0] == 0
    pg.rollback()
    pd.testing.assert_frame_equal(db_read.current(pg, schema, table).set_index(KEY).drop(columns=["_loaded_at"]),
                                  rows)
    assert acl(pg, schema, table) == acl(pg, schema, "made_there") and (0, "SELECT", False) in acl(pg, schema, table)
    versions = db_read.read_frame(pg, sql.SQL("SELECT {}, _run_id, is_current FROM {}").format(
        sql.Identifier(KEY), db.ident(schema, db_schema.history_table(table))))
    assert sorted(versions[KEY]) == sorted(batch[KEY]) and versions["is_current"].all()
    assert [n for n, _, _ in indexes_of(pg, schema, table)] == [f"{table}_pkey" if not taken else f"{table}_pkey1"]


def indexes_of(pg, schema, table) -> list[tuple]:
    with pg.cursor() as cur:
        cur.execute("SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indexrelid::int FROM pg_index i "
                    "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = to_regclass(%s) ORDER BY 1",
                    (db.ident(schema, table).as_string(cur),))
        rows = cur.fetchall()
    pg.rollback()
    return rows


def test_the_checksum_tells_minus_zero_from_zero(pg, unique):
    staged = f"stage_{unique}"
    with db.transaction(pg), pg.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(db.ident(staged)))
        sums = []
        for area in ("0", "-0"):  # as text: a Python -0.0 is sent as the numeric -0.0, which is 0
            db_schema.create_table(cur, staged, f"t{len(sums)}")
            cur.execute(sql.SQL("INSERT INTO {} VALUES ('K', 'K', '{{}}', 1, %s::float8, 'Asia', NULL, '{{}}', '{{}}', '{{}}', "
                                "'{{}}', NULL, NULL, NULL, '{{UTC}}', 'h', 'r', now())").format(
                db.ident(staged, f"t{len(sums)}")), (area,))
            sums.append(db_hash.checksum(cur, db.ident(staged, f"t{len(sums)}")))
    assert sums[0] != sums[1]


@pytest.mark.parametrize("mode, batch_rows, error", [
    ("upsert", [0, 1, 1], "is duplicated"),
    ("append", [0, 1], "append mode keeps existing rows"),
])
def test_a_staged_load_refuses_what_a_merge_refuses_and_leaves_nothing_staged(pg, clean, table, unique, mode,
                                                                             batch_rows, error):
    load(pg, csv(clean.head(3)), table, "r1")
    staged = f"stage_{unique}"
    with db.transaction(pg), pg.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(db.ident(staged)))
    batch = changed(clean.iloc[batch_rows].reset_index(drop=True), 0, population=7)
    with pytest.raises(DatabaseError, match=error):
        db_load.stage(pg, csv(batch), MergeOptions(schema=SCHEMA, table=table, run_id="r2", mode=mode), staged)
    assert not db.table_exists(pg, staged, table)


# --- failures roll back ------------------------------------------------------------------------------

@pytest.mark.parametrize("column, forged", [("population", b"x"), ("population", b"-1"),
                                             ("area", b"1e999"), ("capital", b"not json"),
                                             ("name_official", b"")])
def test_a_bad_value_in_the_csv_rolls_back_and_leaves_the_table_byte_for_byte(pg, clean, table, column, forged):
    load(pg, csv(clean.head(5)), table, "r1")
    before = dump(pg, table)
    frame = clean.head(6).astype({column: object})
    frame.at[5, column] = ["FORGED"] if column in contract.LIST_COLUMNS else "FORGED"
    data = formats.csv_encode(frame[COLUMNS + ["_row_hash"]])
    data = data.replace(b'"[""FORGED""]"', forged).replace(b"FORGED", forged)
    assert data.count(b"FORGED") == 0 and len(data.splitlines()) == 7
    with pytest.raises(DatabaseError, match=f"loading public.{table} failed and was rolled back"):
        load(pg, data, table, "r2")
    assert dump(pg, table) == before


def test_a_failed_first_load_leaves_no_table_behind(pg, clean, table):
    forged = clean.head(2).astype({"population": object})
    forged.at[1, "population"] = "x"
    with pytest.raises(DatabaseError):
        load(pg, formats.csv_encode(forged[COLUMNS + ["_row_hash"]]), table, "r1")
    assert not db.table_exists(pg, SCHEMA, table)
    assert not db.table_exists(pg, SCHEMA, f"{table}_history")


@pytest.mark.parametrize("name", sorted(formats.FORMATS))
def test_array_literal_batches_load_awkward_text_as_the_silver_table_has_it(pg, clean, table, name):
    """The stage's path (formats.copy_csv, lists="array"): stored values read back as JSON give stage
    2's fingerprint (the proof inside the merge), quotes, backslashes, braces and "NULL" included; a
    reload of the same batch changes nothing."""
    from tests.test_formats import AWKWARD, awkward

    frame = awkward(clean)
    out = io.BytesIO()
    formats.copy_csv(formats.get(name).encode(frame), name, out)
    expected = quality.fingerprint(frame[COLUMNS])["fingerprint"]
    result = load(pg, out.getvalue(), table, "r1", full=True, lists="array", expected_fingerprint=expected)
    assert result["inserted"] == len(frame) and result["batch_fingerprint"] == expected
    assert current(pg, table).at[frame.at[0, KEY], "capital"] == AWKWARD
    again = load(pg, out.getvalue(), table, "r2", full=True, lists="array", expected_fingerprint=expected)
    assert again["unchanged"] == len(frame) and again["drift"]["rows"] == 0
    assert load(pg, csv(frame[COLUMNS]), table, "r3")["unchanged"] == len(frame)  # the JSON form: the same rows


@pytest.mark.parametrize("forged", [b'"{""unterminated"', b'"[""json""]"', b"x"])
def test_a_bad_array_literal_rolls_back(pg, clean, table, forged):
    load(pg, csv(clean.head(5)), table, "r1")
    before = dump(pg, table)
    out = io.BytesIO()
    formats.copy_csv(csv(changed(clean.head(6), 5, capital=["FORGED"])), "csv", out)
    data = out.getvalue().replace(b'"{""FORGED""}"', forged)
    assert data.count(b"FORGED") == 0
    with pytest.raises(DatabaseError, match=f"loading public.{table} failed and was rolled back"):
        load(pg, data, table, "r2", lists="array")
    assert dump(pg, table) == before


def test_a_csv_without_the_row_hash_column_is_refused(pg, clean, table):
    with pytest.raises(DatabaseError, match="rolled back"):
        load(pg, formats.csv_encode(clean.head(2)[COLUMNS]), table, "r1")


# --- COPY through a pipe -----------------------------------------------------------------------------

def test_a_batch_fed_by_a_failing_producer_loads_nothing(pg, clean, table):
    """db_pipes.fed: a producer that fails half-way fails the COPY reading it; its own error is raised and
    the cut-off batch is not loaded (not even the table is left)."""
    out = io.BytesIO()
    formats.copy_csv(csv(clean), "csv", out)
    half = out.getvalue()[:len(out.getvalue()) // 2].rsplit(b"\n", 1)[0] + b"\n"

    def produce(sink):
        sink.write(half)
        sink.flush()
        raise formats.FormatError("the silver object broke off")

    with pytest.raises(formats.FormatError, match="broke off"):
        with db_pipes.fed(produce) as (rows, _):
            load(pg, rows, table, "r1", lists="array")
    assert not db.table_exists(pg, SCHEMA, table)
    with db_pipes.fed(lambda sink: formats.copy_csv(csv(clean), "csv", sink)) as (rows, produced):
        assert load(pg, rows, table, "r1", lists="array")["inserted"] == len(clean)
    assert produced["result"] == len(clean)


def test_a_streamed_copy_gives_its_rows_and_raises_the_servers_error_over_a_cut_off_parse(pg):
    """db_pipes.streamed: the rows arrive through the pipe as COPY writes them; a COPY that fails half-way
    raises the server's error (not the reader's, which saw a cut-off stream); a reader that stops early
    ends the COPY, its own error raised, and the connection is usable again after a rollback."""
    import psycopg2

    def copy(query):
        return lambda sink: pg.cursor().copy_expert(f"COPY ({query}) TO STDOUT WITH (FORMAT csv)", sink)

    with db_pipes.streamed(copy("SELECT x, repeat('y', 100) FROM generate_series(1, 100000) x")) as (stream, _):
        lines = stream.read().splitlines()
    assert len(lines) == 100000 and lines[-1].startswith(b"100000,")
    with pytest.raises(psycopg2.errors.DivisionByZero):
        with db_pipes.streamed(copy("SELECT 1 / (50000 - x) FROM generate_series(1, 100000) x")) as (stream, _):
            data = stream.read()
            raise ValueError(f"cut off after {len(data)} bytes")
    pg.rollback()
    with pytest.raises(ValueError, match="stopped"):
        with db_pipes.streamed(copy("SELECT x, repeat('y', 100) FROM generate_series(1, 1000000) x")) as (stream, _):
            stream.read(10)
            raise ValueError("stopped")
    pg.rollback()
    with pg.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)


# --- names are checked before SQL --------------------------------------------------------------------

@pytest.mark.parametrize("schema, name", [(SCHEMA, "a;drop"), (SCHEMA, 'Robert"); --'), ('x"; drop', "t"),
                                          (SCHEMA, "Upper"), (SCHEMA, "t" * 64)])
def test_unsafe_identifiers_are_refused_before_any_sql_runs(pg, clean, schema, name):
    with pg.cursor() as cur:
        cur.execute("SELECT count(*) FROM information_schema.tables")
        tables_before = cur.fetchone()[0]
    with pytest.raises(InvalidName):
        db_load.merge(pg, csv(clean.head(1)), MergeOptions(schema=schema, table=name, run_id="r1"))
    with pytest.raises(InvalidName):
        db_read.current(pg, schema, name)
    with pg.cursor() as cur:
        cur.execute("SELECT count(*) FROM information_schema.tables")
        assert cur.fetchone()[0] == tables_before


def test_bad_run_ids_and_modes_are_refused(pg, clean, table):
    with pytest.raises(InvalidName):
        load(pg, csv(clean.head(1)), table, "r1; drop")
    with pytest.raises(ValueError, match="write mode 'merge'"):
        load(pg, csv(clean.head(1)), table, "r1", mode="merge")
    with pytest.raises(InvalidName):
        db_read.as_of(pg, SCHEMA, table, "../r1")
    assert not db.table_exists(pg, SCHEMA, table)


# --- a killed run's session --------------------------------------------------------------------------

def test_a_load_gives_up_on_a_lock_held_by_another_session(pg, clean, table, lingering):
    before = lingering[1].get_backend_pid()
    with pytest.raises(DatabaseError, match=r"waited 1s for a lock held by another session.*--resume"):
        load(pg, csv(clean.head(5)), table, "r2", lock_timeout="1s")
    assert lingering[1].get_backend_pid() == before  # the other session was left alone


# --- the row hash computed by PostgreSQL --------------------------------------------------------------

DOUBLES = [0.0, -0.0, 1.0, 0.1, 1 / 3, 17098242.0, 1e-05, 0.0001, 0.000123, 1e14, 1e15, 1.5e15,
           9.999999999999998e14, 1234567890123456.8, 1e16, 2.951749533409803e+16, 1e22, 5e-324,
           1.7976931348623157e308, 123456789.125]
TEXTS = ["plain", 'q"uote', "back\\slash", "a\\", 'a",', '","', "tab\tnew\nline\rcr", "\x01\x1f\x7f",
         "é漢字😀", "\u2028", "{brace}", "NULL", " spaced "]


def test_postgresql_hashes_a_row_as_quality_does_or_says_it_cannot(pg, unique):
    """The SQL row hash (the proof's fast path) is `quality.row_hash` for awkward text, lists and
    doubles; where it is not (a double whose shortest digits PostgreSQL rounds otherwise), the row
    is one the proof reads back and hashes itself, so it never decides alone."""
    rows = []
    for i, (text, area) in enumerate(zip(TEXTS * 2, DOUBLES)):
        rows.append([f"k{i}", text, [text, "x"] if i % 2 else [], i * 1_000_000_007, area, "Asia", None if i % 3 else text,
                     [], [text], ["EUR"], [], None, None, text, ["UTC"]])
    staged = f"stage_{unique}"
    with db.transaction(pg), pg.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(db.ident(staged)))
        db_schema.create_table(cur, staged, "t")
        for row in rows:
            cur.execute(sql.SQL("INSERT INTO {} VALUES ({}, 'h', 'r', now())").format(
                db.ident(staged, "t"), sql.SQL(", ").join([sql.SQL("%s")] * 4 + [sql.SQL("%s::float8")]
                                                          + [sql.SQL("%s")] * 10)),
                [*row[:4], repr(row[4]), *row[5:]])
        cur.execute("SET LOCAL extra_float_digits = 1")
        cur.execute(sql.SQL("SELECT {}, {} FROM {} t ORDER BY {}").format(
            sql.Identifier("t", KEY), db_hash.row_hash("t"), db.ident(staged, "t"), sql.Identifier("t", KEY)))
        by_sql = dict(cur.fetchall())
    expected = {row[0]: quality.row_hash(row) for row in rows}
    differ = sorted(k for k in expected if by_sql[k] != expected[k])
    tie = {f"k{i}" for i, area in enumerate(DOUBLES) if area == 2.951749533409803e+16}
    assert set(differ) <= tie, [(k, rows[int(k[1:])]) for k in differ]


def test_a_double_postgresql_writes_otherwise_is_proven_by_the_rows_own_hash(pg, clean, table):
    batch = changed(clean.head(4), 1, area=2.951749533409803e+16)  # PostgreSQL: 2.9517495334098032e+16
    batch = changed(batch, 2, area=-0.0)
    silver = quality.fingerprint(batch)["fingerprint"]
    result = load(pg, csv(batch), table, "r1", expected_fingerprint=silver, full=True)
    assert (result["batch_fingerprint"], result["current_fingerprint"]) == (silver, silver)
    assert result["drift"]["rows"] == 0
    again = load(pg, csv(batch), table, "r2", expected_fingerprint=silver, full=True)
    assert (again["unchanged"], again["drift"]["rows"]) == (4, 0)
