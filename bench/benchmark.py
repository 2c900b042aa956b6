#!/usr/bin/env python3
"""Speed and memory figures for the pipeline's hot paths, printed, never asserted.

    make bench                       (or: python bench/benchmark.py --scale 40)

It times the transformation steps on the 250-record snapshot and on a scaled copy (each record
repeated with a unique name), then a COPY-and-merge load and a streamed export on a private embedded
stack (its own state folder and ports, removed afterwards). Peak memory is Python's own allocation
peak (tracemalloc) for the step, plus the process's max RSS at the end.

Each figure is printed beside its target and marked `ok` or `OVER` (the script never fails on it):
  - per 1,000 records: flatten 200 ms, validate 500 ms, encode 400 ms, decode 300 ms (CSV and Parquet), fingerprint
    200 ms, and a Python peak of 4 MiB for any of these (memory grows with the batch, not faster);
  - a COPY-and-merge load of 250 rows 1 s, of the scaled table 5 s; a no-change reload half that;
  - the export streams: its Python peak stays under 12 MiB (the spool keeps 8 MiB in memory, then
    spills to disk), whatever the table size.
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

from lib import config, contract, db, formats, quality, source, stack, storage, transform


def measure(label: str, fn, *args, max_ms: float | None = None, max_mib: float | None = None, **kwargs):
    """Run fn once; print its time and Python allocation peak against the targets given."""
    tracemalloc.start()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    ms = (time.perf_counter() - start) * 1000
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    mib = peak / 2**20
    verdict = []
    if max_ms is not None:
        verdict.append(f"≤{max_ms:.0f} ms {'ok' if ms <= max_ms else 'OVER'}")
    if max_mib is not None:
        verdict.append(f"≤{max_mib:.0f} MiB {'ok' if mib <= max_mib else 'OVER'}")
    print(f"  {label:<40} {ms:>9.1f} ms  peak {mib:>6.1f} MiB   {', '.join(verdict)}")
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
    per_k = max(len(records), 1000) / 1000  # targets scale with size, from a 1,000-record floor
    frame = measure("flatten", transform.flatten, records, max_ms=200 * per_k, max_mib=4 * per_k)
    checked = measure("validate (pandera contract + quarantine)", quality.validate, frame, records,
                      max_ms=500 * per_k, max_mib=4 * per_k)
    table = checked.clean[contract.COLUMNS + ["_row_hash"]]
    encoded = {}
    for fmt in formats.FORMATS.values():  # the silver/gold format: the default is the faster round trip
        encoded[fmt.name] = measure(f"{fmt.name}: encode", fmt.encode, table, max_ms=400 * per_k, max_mib=4 * per_k)
        back = measure(f"{fmt.name}: decode (typed)", fmt.decode, encoded[fmt.name],
                       max_ms=300 * per_k, max_mib=4 * per_k)
        print(f"  {'':<40} {len(encoded[fmt.name]) / 2**10:>9.1f} KiB")
    measure("fingerprint", quality.fingerprint, back, max_ms=200 * per_k, max_mib=4 * per_k)
    return encoded["csv"]


def database_figures(data: bytes, port_base: int, load_ms: float) -> None:
    sdir = Path(tempfile.mkdtemp(prefix="medallion-bench-"))
    try:
        stack.init_state(sdir, port_base)
        stack.up(sdir)
        settings = config.settings({"PIPELINE_STATE_DIR": str(sdir)})
        conn = db.connect(settings.db)
        measure("load: COPY + merge, new table", db.merge, conn, data, schema="public", table="bench",
                run_id="bench-1", max_ms=load_ms)
        measure("load again: nothing changed", db.merge, conn, data, schema="public", table="bench",
                run_id="bench-2", max_ms=load_ms / 2)
        spool = storage.HashingSpool()
        rows = measure("export: COPY TO STDOUT into a spool", db.copy_out, conn, "public", "bench", spool,
                       max_mib=12)
        print(f"  {'':<40} {rows} rows, {spool.size / 2**20:.1f} MiB exported")
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
    database_figures(data, args.port_base, load_ms=1000)
    print(f"database (private embedded stack, {len(big)} rows)")
    database_figures(big_data, args.port_base, load_ms=5000)
    print(f"max RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
