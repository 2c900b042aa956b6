"""What the db tests share: silver CSVs, loads with their counts, and reads of the current table,
its history and the load log. Their fixtures (`clean`, `table`, `lingering`) are in conftest.py."""

from __future__ import annotations

import io

from psycopg2 import sql

from lib import db, db_load, db_read, formats, quality
from lib.contract import COLUMNS, KEY
from lib.db_load import MergeOptions

SCHEMA = "public"


def csv(frame) -> bytes:
    """A silver CSV as 02_clean writes it, with row hashes recomputed from the values."""
    frame = frame.copy()
    frame["_row_hash"] = [quality.row_hash(r) for r in frame[COLUMNS].itertuples(index=False)]
    return formats.csv_encode(frame[COLUMNS + ["_row_hash"]])


def changed(frame, index, **values):
    frame = frame.copy()
    for col, value in values.items():
        frame.at[index, col] = value
    return frame


def history(pg, table):
    return db_read.read_frame(pg, sql.SQL("SELECT {k}, population, _run_id, valid_to, is_current FROM {h} "
                                          "ORDER BY version_id").format(k=sql.Identifier(KEY),
                                                                        h=db.ident(SCHEMA, f"{table}_history")))


def current(pg, table):
    return db_read.current(pg, SCHEMA, table).set_index(KEY)


COUNTS = ("inserted", "updated", "unchanged", "retired", "current_rows", "mode")


def load(pg, data, table, run_id, full=False, **kw):
    """A merge; its counts (`full`: everything it returns, with the fingerprint, drift and load id)."""
    result = db_load.merge(pg, data, MergeOptions(schema=SCHEMA, table=table, run_id=run_id, **kw))
    return result if full else {k: result[k] for k in COUNTS}


def dump(pg, table) -> bytes:
    """Every byte of the table, its history and its load log, as COPY renders them."""
    out = io.BytesIO()
    for name in (table, f"{table}_history"):
        db_read.copy_out(pg, SCHEMA, name, out, pipeline_table=False)
    with pg.cursor() as cur:
        cur.execute("SELECT * FROM pipeline_loads WHERE table_name = %s ORDER BY run_id", (table,))
        out.write(repr(cur.fetchall()).encode())
    return out.getvalue()

