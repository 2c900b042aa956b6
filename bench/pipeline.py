"""Whole-pipeline figures for bench/benchmark.py: `run_pipeline.py` against the same lib stage functions
called in one plain Python process, the scale curve, and each stage against its raw-tool floor.

Every measured run is a child process on a private embedded stack, served by the test API server
(tests/api_server.py) in this process; CPU is the child's own plus its reaped descendants' (the
kernel), from os.wait4; peak RSS is the whole process tree (the child and its kernel, not the servers),
sampled with psutil.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Measured:
    wall: float
    cpu: float
    peak_rss: int
    code: int
    out: str = ""
    extra: dict = field(default_factory=dict)


def _tree(proc) -> list:
    """The process and its descendants (psutil finds them by reading every process of the machine)."""
    import psutil

    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def _rss(procs: list) -> int:
    import psutil

    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(argv: list[str], env: dict, interval: float = 0.05, tree_every: float = 0.5) -> Measured:
    """Run argv to its end: wall time, CPU (user + system of it and its reaped children), peak RSS of
    its process tree: the tree's members are looked up every `tree_every` seconds, their memory read
    every `interval` (looking the tree up each time took ~2 ms, 4% of a core beside the runs
    measured)."""
    import psutil

    out = tempfile.TemporaryFile()
    started = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        proc = psutil.Process(child.pid)
        procs, looked_up = [], 0.0
        while not done.is_set():
            if time.monotonic() - looked_up >= tree_every:
                procs, looked_up = _tree(proc), time.monotonic()
            peak = max(peak, _rss(procs))
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    text = out.read().decode("utf-8", "replace")
    out.close()
    return Measured(wall, usage.ru_utime + usage.ru_stime, peak, child.returncode, text)


# --- the plain process: the stage functions, no notebooks -----------------------------------------------

def plain(run_id: str, table: str) -> None:
    """The stages as the notebooks call them, minus the notebooks (and their previews), and minus what
    a run outside the runner does at each stage's end (its manifest, pages and index: lib/stages/
    context.py `StageRun.ended`): the process says it is the runner of its run, which it is."""
    from lib import publish, runs
    from lib.stages import clean, context, export, gold, ingest, load

    os.environ[runs.RUNNER_ENV] = run_id
    s = context.begin("01_ingest", run_id, min_records=200)
    ingest.run(s)
    s.finish()
    s = context.begin("02_clean", run_id)
    clean.write(s, clean.prepare(s))
    s.finish()
    s = context.begin("03_load", run_id, table=table)
    load.run(s)
    s.finish()
    s = context.begin("04_export", run_id, table=table)
    export.run(s)
    s.finish()
    s = context.begin("05_gold", run_id, table=table)
    golden = gold.build(s)
    gold.reconcile(s, golden)
    s.finish()
    publish.run(s.settings, run_id)


# --- floors: the raw tools on the same data ------------------------------------------------------------

def _timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def psql_path() -> str:
    """pgserver's bundled psql (lib/stack.py finds it without importing pgserver, whose import warns
    where XDG_RUNTIME_DIR is not set)."""
    from lib import stack

    bundled = Path(stack.pg_bin("psql"))
    return str(bundled) if bundled.exists() else "psql"


def floors(settings, run_id: str, table: str, api_url: str) -> dict[str, float]:
    """Seconds each hop takes with the plain tools, on this run's own objects:
    ingest: a streamed GET uploaded as it arrives; clean: the raw object read, parsed and written as
    Parquet with pyarrow; load: `psql \\copy` of the silver rows as CSV; export: COPY ... TO STDOUT
    into a file, uploaded."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import requests

    from lib import contract, db, formats, layout, storage
    from lib.stages.context import run_objects

    s3 = storage.client(settings.store)
    cloud = storage.cloud_client(settings.cloud)
    out: dict[str, float] = {}

    def ingest():
        with requests.get(api_url, stream=True, timeout=(5, 300)) as response:
            response.raise_for_status()
            response.raw.decode_content = True
            s3.upload_fileobj(response.raw, settings.raw_bucket, f"bench-floor/{run_id}/countries.json")
    out["01_ingest"] = _timed(ingest)

    raw_key = run_objects(s3, settings.raw_bucket, run_id)[-1]["key"]

    def clean():
        data = s3.get_object(Bucket=settings.raw_bucket, Key=raw_key)["Body"].read()
        records = json.loads(data)
        del data
        # The contract's columns read as it declares them (lib/contract.py `Column.source`), unchecked.
        rows = {c.name: [c.source.read(r) for r in records] for c in contract.CONTRACT}
        del records
        buf = io.BytesIO()
        pq.write_table(pa.table(rows), buf, compression="zstd")
        s3.put_object(Bucket=settings.clean_bucket, Key=f"bench-floor/{run_id}/clean.parquet", Body=buf.getvalue())
    out["02_clean"] = _timed(clean)

    def clean_strong():
        """The strong floor: msgspec's decoder, the pipeline's own flatten (lib/transform.py), pyarrow."""
        import msgspec

        from lib import transform

        data = s3.get_object(Bucket=settings.raw_bucket, Key=raw_key)["Body"].read()
        records = msgspec.json.decode(data)
        del data
        frame = transform.flatten(records)
        del records
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buf, compression="zstd")
        s3.put_object(Bucket=settings.clean_bucket, Key=f"bench-floor/{run_id}/clean-strong.parquet", Body=buf.getvalue())
    out["02_clean_strong"] = _timed(clean_strong)

    # The same silver rows as CSV on disk, for psql.
    obj = [o for o in run_objects(s3, settings.clean_bucket, run_id) if layout.is_clean(o["key"])][-1]
    data, _ = storage.get_bytes(s3, settings.clean_bucket, obj["key"])
    fmt = formats.of_key(obj["key"])
    csv_path = Path(tempfile.mkstemp(suffix=".csv")[1])
    try:
        csv_path.write_bytes(data if fmt.name == "csv" else formats.get("csv").encode(fmt.decode(data)))
        del data
        conn = db.connect(settings.db)
        conn.autocommit = True
        floor_table = f"floor_{table}"[:60]
        cols = ", ".join([*contract.COLUMNS, "_row_hash"])
        with conn.cursor() as cur:  # text columns, as the load's own staging table
            cur.execute(f'DROP TABLE IF EXISTS "{floor_table}"')
            cur.execute(f'CREATE TABLE "{floor_table}" ({", ".join(c + " text" for c in cols.split(", "))})')
        env = {**os.environ, "PGPASSWORD": settings.db.password.reveal()}
        psql = [psql_path(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", settings.db.host, "-p", str(settings.db.port),
                "-U", settings.db.user, "-d", settings.db.name, "-c",
                f'\\copy "{floor_table}" ({cols}) FROM \'{csv_path}\' WITH (FORMAT csv, HEADER true)']
        out["03_load"] = _timed(subprocess.run, psql, env=env, check=True, stdin=subprocess.DEVNULL)
        out["load_typed"] = typed_floor(settings, conn, env, fmt.name, obj["key"], table)

        def export():
            spool = storage.HashingSpool()
            with conn.cursor() as cur:
                cur.copy_expert(f'COPY (SELECT * FROM "{table}") TO STDOUT WITH (FORMAT csv, HEADER true)', spool)
            cloud.upload_fileobj(spool.rewound(), settings.cloud.bucket, f"bench-floor/{run_id}/{table}.csv")
            spool.close()
        out["04_export"] = _timed(export)
        with conn.cursor() as cur:
            cur.execute(f'DROP TABLE IF EXISTS "{floor_table}"')
        conn.close()
    finally:
        csv_path.unlink(missing_ok=True)
    return out


FLOOR_SQL = ROOT / "bench" / "floor_load.sql"


def typed_floor(settings, conn, env: dict, format_name: str, clean_key: str, table: str) -> float:
    """Seconds bench/floor_load.sql takes with psql to merge the run's silver rows (the CSV the load's
    COPY reads, written before the clock starts) into a new keyed table and its history, made by the
    pipeline's own DDL: the typed, keyed floor of the load and publish."""
    from psycopg2 import sql

    from lib import contract, db_schema, formats, storage

    s3 = storage.client(settings.store)
    data, _ = storage.get_bytes(s3, settings.clean_bucket, clean_key)
    batch = Path(tempfile.mkstemp(suffix=".csv")[1])
    floor_table = f"typed_floor_{table}"[:50]
    try:
        with batch.open("wb") as sink:
            formats.copy_csv(data, format_name, sink)
        del data
        with conn.cursor() as cur:
            for name in (floor_table, db_schema.history_table(floor_table)):
                cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier("public", name)))
            db_schema.ensure_tables(cur, "public", floor_table)

        def quoted(name):
            return sql.Identifier(name).as_string(conn)

        cols = ", ".join(quoted(c) for c in contract.COLUMNS)
        variables = {
            "target": sql.Identifier("public", floor_table).as_string(conn),
            "history": sql.Identifier("public", db_schema.history_table(floor_table)).as_string(conn),
            "key": quoted(contract.KEY), "cols": cols, "run_id": "bench-floor",
            "typed": ", ".join(f"{quoted(c.name)} {c.type.sql}" for c in contract.CONTRACT),
            "updates": ", ".join(f"{quoted(c)} = EXCLUDED.{quoted(c)}" for c in contract.COLUMNS[1:]),
        }
        psql = [psql_path(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", settings.db.host, "-p", str(settings.db.port),
                "-U", settings.db.user, "-d", settings.db.name, "-f", str(FLOOR_SQL)]
        for name, value in variables.items():
            psql += ["-v", f"{name}={value}"]
        with batch.open("rb") as rows:
            took = _timed(subprocess.run, psql, env=env, check=True, stdin=rows)
        with conn.cursor() as cur:
            cur.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("public", floor_table)))
            if cur.fetchone()[0] == 0:
                raise RuntimeError("the typed floor loaded no rows")
            for name in (floor_table, db_schema.history_table(floor_table)):
                cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier("public", name)))
        return took
    finally:
        batch.unlink(missing_ok=True)


if __name__ == "__main__":  # python bench/pipeline.py plain RUN_ID TABLE
    if sys.argv[1] == "plain":
        plain(sys.argv[2], sys.argv[3])
