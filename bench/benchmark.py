#!/usr/bin/env python3
"""Speed and memory figures for the pipeline's hot paths, printed, never asserted.

    make bench                       (or: python bench/benchmark.py --scale 40)

It times the transformation steps on the 250-record snapshot and on a scaled copy (each record
repeated with a unique name), then a COPY-and-merge load and a streamed export on a private embedded
stack (its own state folder and ports, removed afterwards). Peak memory is Python's own allocation
peak (tracemalloc) for the step, plus the process's max RSS at the end.

Targets (what the figures are read against):
  - 250 records: flatten + validate + CSV well under 1 s; the whole load under 1 s.
  - the export streams: its Python peak stays near the spool threshold (8 MiB), not the table size.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

from lib import config, db, quality, source, stack, storage, transform


def measure(label: str, fn, *args, **kwargs):
    tracemalloc.start()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"  {label:<44} {seconds * 1000:>9.1f} ms   peak {peak / 2**20:>7.1f} MiB")
    return result


def scaled(records: list[dict], factor: int) -> list[dict]:
    out = []
    for i in range(factor):
        for r in records:
            copy = json.loads(json.dumps(r))
            copy["name"]["common"] = f"{copy['name']['common']} #{i}"
            out.append(copy)
    return out


def transform_figures(records: list[dict]) -> bytes:
    frame = measure("flatten", transform.flatten, records)
    checked = measure("validate (pandera contract + quarantine)", quality.validate, frame, records)
    data = measure("to CSV", transform.to_csv, checked.clean, quality.COLUMNS + ["_row_hash"])
    back = measure("read CSV back (typed)", transform.read_csv, data)
    measure("fingerprint", quality.fingerprint, back)
    return data


def database_figures(data: bytes, port_base: int) -> None:
    sdir = Path(tempfile.mkdtemp(prefix="medallion-bench-"))
    try:
        stack.init_state(sdir, port_base)
        stack.up(sdir)
        settings = config.load({"PIPELINE_STATE_DIR": str(sdir)})
        conn = db.connect(settings.db)
        measure("load: COPY + merge, new table", db.load, conn, data, schema="public", table="bench",
                run_id="bench-1")
        measure("load again: nothing changed", db.load, conn, data, schema="public", table="bench",
                run_id="bench-2")
        spool = storage.HashingSpool()
        rows = measure("export: COPY TO STDOUT into a spool", db.copy_out, conn, "public", "bench", spool)
        print(f"  {'':<44} {rows} rows, {spool.size / 2**20:.1f} MiB exported")
        spool.close()
        conn.close()
    finally:
        stack.down(sdir)
        shutil.rmtree(sdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=40, help="copies of the snapshot for the scaled run (default 40)")
    parser.add_argument("--port-base", type=int, default=18930, help="ports of the private stack (default 18930)")
    args = parser.parse_args()

    records = source.parse_payload(source.snapshot_bytes())
    print(f"snapshot: {len(records)} records")
    data = transform_figures(records)
    big = scaled(records, args.scale)
    print(f"scaled x{args.scale}: {len(big)} records")
    big_data = transform_figures(big)

    print(f"database (private embedded stack, {len(records)} rows)")
    database_figures(data, args.port_base)
    print(f"database (private embedded stack, {len(big)} rows)")
    database_figures(big_data, args.port_base)
    print(f"max RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
