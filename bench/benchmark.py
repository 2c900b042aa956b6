#!/usr/bin/env python3
"""Speed and memory figures of the pipeline, printed beside their targets (`ok` or `OVER`), never asserted.

    make bench                                     250 records and the curve up to 25,000
    make bench ARGS="--max-records 1000000"        the curve up to a million (about 10 minutes or more)
    make bench ARGS="--only micro"                 only the per-step figures

On a private embedded stack (its own state folder and ports, removed afterwards) and the test API
server (tests/api_server.py, serving N records as copies of the 250 with unique names, streamed):

1. 250 records: a full `run_pipeline.py` run against the same lib stage functions called in one plain
   Python process (bench/pipeline.py), and against the seed's five stages written as one plain script
   (bench/seed.py), in rounds after one uncounted run of each, medians; targets: the runner within
   1.8x the plain process in CPU (user + system of the process and its kernel; a gate) and 1.5x in
   wall time, and within 3x the seed script in wall time (a gate).
2. The scale curve at 250 / 25k / 250k / 1M records (up to --max-records): the whole run's wall, CPU
   and peak RSS of the process tree (runner + kernel, not the servers), its publish included, and each
   stage against its raw-tool floor on the same data (ingest: a streamed GET uploaded as it arrives;
   clean: the payload parsed and written as Parquet with pyarrow, and the strong floor: msgspec, the
   same flatten, pyarrow; load: `psql \\copy`, and the typed, keyed floor: bench/floor_load.sql with
   psql, which load + publish is compared with; export: COPY TO STDOUT uploaded); targets: ingest and
   export within 2x, clean within 1.5x the strong floor, load + publish within 1.5x the typed floor
   (a gate from 250k); at 1M records the run in 60 s and 768 MiB (stretch targets).
   A plot of time and memory against records goes to bench/results/ with the machine it ran on.
3. Memory (from --max-records 25000): 100,000 records into a fresh table, 30 s and 512 MiB (a gate);
   after the 1M run, 100,000 records into its 1,000,000-row table: at most 10 % more memory (a gate).
4. Per-step figures (the older section): per 1,000 records, flatten 200 ms, validate 500 ms, encode
   400 ms, decode 300 ms (CSV and Parquet), fingerprint 200 ms, and a Python peak of 4 MiB for any of
   these; a COPY-and-merge load of 250 rows 1 s, of the scaled table 5 s, a no-change reload half
   that; the export streams (Python peak under 12 MiB whatever the table size).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from lib import (config, contract, db, db_load, db_read, formats, quality, registry, source, stack, stack_state,
                 storage, transform)

from bench import pipeline

ROOT = Path(__file__).resolve().parents[1]


def measure(label: str, fn, *args, max_ms: float | None = None, max_mib: float | None = None, **kwargs):
    """Run fn once; print its time and Python allocation peak against the targets given. Tracing
    starts once and stays on (only its peak is reset): stopping it while pyarrow's threads still free
    memory crashes CPython 3.11."""
    if not tracemalloc.is_tracing():
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    ms = (time.perf_counter() - start) * 1000
    _, peak = tracemalloc.get_traced_memory()
    mib = max(peak - base, 0) / 2**20
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
        stack_state.init_state(sdir, port_base)
        stack.up(sdir)
        settings = config.settings({"PIPELINE_STATE_DIR": str(sdir)})
        conn = db.connect(settings.db)
        measure("load: COPY + merge, new table", db_load.merge, conn, data,
                db_load.MergeOptions(schema="public", table="bench", run_id="bench-1"), max_ms=load_ms)
        measure("load again: nothing changed", db_load.merge, conn, data,
                db_load.MergeOptions(schema="public", table="bench", run_id="bench-2"), max_ms=load_ms / 2)
        spool = storage.HashingSpool()
        rows = measure("export: COPY TO STDOUT into a spool", db_read.copy_out, conn, "public", "bench", spool,
                       max_mib=12)
        print(f"  {'':<40} {rows} rows, {spool.size / 2**20:.1f} MiB exported")
        spool.close()
        conn.close()
    finally:
        stack.down(sdir)
        shutil.rmtree(sdir, ignore_errors=True)


# --- whole runs ----------------------------------------------------------------------------------------

CURVE = (250, 25_000, 250_000, 1_000_000)
RUN_TARGET_S, RSS_TARGET = 60.0, 768 * 2**20  # at 1M records, with its publish (stretch targets)
STAGE_FLOOR_FACTOR = 2.0  # ingest and export against their raw-tool floors
PLAIN_CPU, PLAIN_WALL = 1.8, 1.5  # 250 records: the runner against the stage functions in one process
SEED_WALL = 3.0  # 250 records: the runner against the seed's five stages as one plain script
TYPED_FLOOR_FACTOR = 1.5  # load + publish against the typed, keyed floor (bench/floor_load.sql)
STRONG_CLEAN_FACTOR = 1.5  # clean against msgspec + the same flatten + pyarrow
MEMORY_RECORDS, MEMORY_WALL_S, MEMORY_RSS = 100_000, 30.0, 512 * 2**20  # a fresh table
GROWN_TABLE_SLACK = 1.10  # the same batch into a 1,000,000-row table: at most 10 % more memory


def _verdict(ok: bool) -> str:
    return "ok" if ok else "OVER"


def _median(values):
    return statistics.median(values)


def machine() -> dict:
    import platform

    load = os.getloadavg()
    return {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpus": os.cpu_count(), "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()} {platform.machine()}",
            "load_average_1_5_15": [round(x, 2) for x in load]}


class Bench:
    """A private stack, the test API server, and the environment the measured runs see."""

    def __init__(self, port_base: int):
        from tests.api_server import RestCountriesServer

        self.base = Path(tempfile.mkdtemp(prefix="medallion-bench-"))
        self.sdir = self.base / "state"
        stack_state.init_state(self.sdir, port_base)
        try:
            stack.up(self.sdir)
        except BaseException:
            stack.down(self.sdir)
            shutil.rmtree(self.base, ignore_errors=True)
            raise
        self.api = RestCountriesServer()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "MINIO_", "AWS_"))}
        self.env.update({"PIPELINE_ENV_FILE": "", "PIPELINE_STATE_DIR": str(self.sdir),
                         "PIPELINE_OUTPUTS_DIR": str(self.base / "outputs"), "PIPELINE_LOGS_DIR": str(self.base / "logs"),
                         "PIPELINE_STACK_PORT_BASE": str(port_base), "API_BASE_URL": self.api.url,
                         "SNAPSHOT_FALLBACK": "false"})
        self.settings = config.settings(self.env)
        self.count = 0

    def close(self) -> None:
        self.api.close()
        stack.down(self.sdir)
        shutil.rmtree(self.base, ignore_errors=True)

    def ids(self, what: str) -> tuple[str, str]:
        self.count += 1
        return f"bench-{what}-{self.count}", f"bench_{what}_{self.count}"

    def runner(self, run_id: str, table: str) -> pipeline.Measured:
        m = pipeline.measure([sys.executable, str(ROOT / "run_pipeline.py"), "--run-id", run_id, "-p", f"table={table}"],
                             self.env)
        manifest = json.loads((self.base / "outputs" / "runs" / run_id / "manifest.json").read_text())
        m.extra = {s: e.get("duration_s", 0.0) for s, e in manifest["stages"].items()}
        m.extra["status"] = manifest["status"]
        m.extra["publish"] = manifest.get("publish_s", 0.0)
        return m

    def plain(self, run_id: str, table: str) -> pipeline.Measured:
        return pipeline.measure([sys.executable, str(ROOT / "bench" / "pipeline.py"), "plain", run_id, table], self.env)

    def seed(self, run_id: str, table: str) -> pipeline.Measured:
        return pipeline.measure([sys.executable, str(ROOT / "bench" / "seed.py"), run_id, table], self.env)


def _check(m: pipeline.Measured, what: str) -> None:
    if m.code != 0:
        print(m.out[-3000:])
        raise SystemExit(f"{what} failed (exit {m.code})")


def comparison(bench: Bench, repeats: int) -> dict:
    print(f"\n1. 250 records: run_pipeline.py against the stage functions in one plain process, and against "
          f"the seed's five stages as one plain script ({repeats} rounds after one uncounted run of each, medians)")
    bench.api.copies = 1
    # The first run on the new stack creates its buckets (SeaweedFS sets up their volumes) and its
    # tables: one run of each, not counted, comes first.
    _check(bench.runner(*bench.ids("warmup")), "run_pipeline.py (warm-up)")
    _check(bench.plain(*bench.ids("warmup")), "the plain process (warm-up)")
    _check(bench.seed(*bench.ids("warmup")), "the seed script (warm-up)")
    runner, plain, seed = [], [], []
    for i in range(repeats):
        r = bench.runner(*bench.ids("runner"))
        _check(r, "run_pipeline.py")
        p = bench.plain(*bench.ids("plain"))
        _check(p, "the plain process")
        s = bench.seed(*bench.ids("seed"))
        _check(s, "the seed script")
        runner.append(r)
        plain.append(p)
        seed.append(s)
        print(f"  round {i + 1}: runner {r.wall:5.1f} s wall {r.cpu:5.1f} s CPU {r.peak_rss / 2**20:5.0f} MiB | "
              f"plain {p.wall:5.1f} s wall {p.cpu:5.1f} s CPU {p.peak_rss / 2**20:5.0f} MiB | "
              f"seed {s.wall:5.1f} s wall {s.cpu:5.1f} s CPU")
    out = {"runner_wall": _median([m.wall for m in runner]), "runner_cpu": _median([m.cpu for m in runner]),
           "plain_wall": _median([m.wall for m in plain]), "plain_cpu": _median([m.cpu for m in plain]),
           "seed_wall": _median([m.wall for m in seed]), "seed_cpu": _median([m.cpu for m in seed])}
    for kind, target, gate in (("wall", PLAIN_WALL, ""), ("cpu", PLAIN_CPU, " (gate)")):
        ratio = out[f"runner_{kind}"] / out[f"plain_{kind}"]
        out[f"ratio_{kind}"] = ratio
        print(f"  {kind:<5} runner {out[f'runner_{kind}']:5.1f} s, plain {out[f'plain_{kind}']:5.1f} s: "
              f"{ratio:.2f}x   ≤{target}x{gate} {_verdict(ratio <= target)}")
    out["ratio_seed_wall"] = out["runner_wall"] / out["seed_wall"]
    print(f"  wall  runner {out['runner_wall']:5.1f} s, seed script {out['seed_wall']:5.1f} s: "
          f"{out['ratio_seed_wall']:.2f}x   ≤{SEED_WALL:.0f}x (gate) {_verdict(out['ratio_seed_wall'] <= SEED_WALL)}")
    stages = registry.NAMES
    print("  runner's stage times (median): " + ", ".join(
        f"{s} {_median([m.extra.get(s, 0) for m in runner]):.1f} s" for s in stages))
    return out


def curve(bench: Bench, sizes: list[int]) -> list[dict]:
    print("\n2. scale: whole runs with their publish (runner + kernel; servers not counted), each stage "
          "against its floor")
    rows = []
    for n in sizes:
        bench.api.copies = max(1, n // 250)
        run_id, table = bench.ids(f"n{n}")
        m = bench.runner(run_id, table)
        _check(m, f"run_pipeline.py at {n} records")
        fl = pipeline.floors(bench.settings, run_id, table, bench.api.url)
        row = {"records": n, "wall": m.wall, "cpu": m.cpu, "peak_rss": m.peak_rss, "table": table,
               "stages": {s: m.extra.get(s) for s in registry.NAMES}, "publish": m.extra.get("publish"), "floors": fl}
        rows.append(row)
        at_target = n >= 1_000_000
        print(f"  {n:>9,} records: {m.wall:6.1f} s wall {m.cpu:6.1f} s CPU, peak {m.peak_rss / 2**20:6.0f} MiB"
              + (f"   ≤{RUN_TARGET_S:.0f} s (stretch) {_verdict(m.wall <= RUN_TARGET_S)}, "
                 f"≤{RSS_TARGET / 2**20:.0f} MiB (stretch) {_verdict(m.peak_rss <= RSS_TARGET)}" if at_target else ""))
        for stage in registry.NAMES:
            took, floor = m.extra.get(stage, 0.0), fl.get(stage)
            if floor:
                ratio = took / floor
                print(f"      {stage:<10} {took:7.1f} s  floor {floor:6.2f} s  {ratio:6.1f}x   "
                      f"≤{STAGE_FLOOR_FACTOR:.0f}x {_verdict(ratio <= STAGE_FLOOR_FACTOR)}")
            else:
                print(f"      {stage:<10} {took:7.1f} s  (no floor)")
        clean, strong = m.extra.get("02_clean", 0.0), fl.get("02_clean_strong")
        if strong:
            print(f"      {'clean':<10} {clean:7.1f} s  strong floor (msgspec + flatten + pyarrow) {strong:6.2f} s  "
                  f"{clean / strong:6.1f}x   ≤{STRONG_CLEAN_FACTOR}x {_verdict(clean / strong <= STRONG_CLEAN_FACTOR)}")
        load = m.extra.get("03_load", 0.0) + (m.extra.get("publish") or 0.0)
        typed = fl.get("load_typed")
        if typed:
            gate = " (gate)" if n >= 250_000 else ""
            print(f"      {'load+pub':<10} {load:7.1f} s  typed keyed floor (bench/floor_load.sql) {typed:6.2f} s  "
                  f"{load / typed:6.1f}x   ≤{TYPED_FLOOR_FACTOR}x{gate} {_verdict(load / typed <= TYPED_FLOOR_FACTOR)}")
    return rows


def memory(bench: Bench, grown: dict | None) -> dict:
    """100,000 records into a fresh table, and (after the curve's million-record run) into that
    1,000,000-row table: 900,000 countries retired, a change report of 900,000 removals."""
    print(f"\n3. memory: {MEMORY_RECORDS:,} records (peak RSS of the runner and its kernel)")
    bench.api.copies = MEMORY_RECORDS // 250
    fresh = bench.runner(*bench.ids("fresh"))
    _check(fresh, f"run_pipeline.py at {MEMORY_RECORDS} records")
    out = {"fresh_wall": fresh.wall, "fresh_rss": fresh.peak_rss}
    print(f"  into a fresh table:            {fresh.wall:6.1f} s wall  peak {fresh.peak_rss / 2**20:6.0f} MiB   "
          f"≤{MEMORY_WALL_S:.0f} s {_verdict(fresh.wall <= MEMORY_WALL_S)}, "
          f"≤{MEMORY_RSS / 2**20:.0f} MiB (gate) {_verdict(fresh.peak_rss <= MEMORY_RSS)}")
    if grown is None:
        print("  into a 1,000,000-row table:    not measured (it follows the curve's million-record run: "
              "--max-records 1000000)")
        return out
    run_id, _ = bench.ids("grown")
    again = bench.runner(run_id, grown["table"])
    _check(again, f"run_pipeline.py at {MEMORY_RECORDS} records into the 1,000,000-row table")
    limit = fresh.peak_rss * GROWN_TABLE_SLACK
    out.update(grown_wall=again.wall, grown_rss=again.peak_rss, grown_load=again.extra.get("03_load"))
    print(f"  into a 1,000,000-row table:    {again.wall:6.1f} s wall  peak {again.peak_rss / 2**20:6.0f} MiB   "
          f"≤ fresh + 10 % = {limit / 2**20:.0f} MiB (gate) {_verdict(again.peak_rss <= limit)}; "
          f"stages " + ", ".join(f"{s} {again.extra.get(s, 0):.1f} s" for s in registry.NAMES)
          + f", publish {again.extra.get('publish') or 0:.1f} s")
    return out


def plot(rows: list[dict], comparison_: dict | None, where: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where.mkdir(parents=True, exist_ok=True)
    info = machine()
    records = [r["records"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(records, [r["wall"] for r in rows], "o-", label="whole run (wall)")
    left.plot(records, [r["cpu"] for r in rows], "s--", label="whole run (CPU)")
    for stage in registry.NAMES:
        left.plot(records, [r["stages"].get(stage) or 0 for r in rows], ".:", label=stage)
    left.axhline(RUN_TARGET_S, color="red", lw=0.8, label=f"target at 1M: {RUN_TARGET_S:.0f} s")
    left.set_xscale("log"); left.set_yscale("log"); left.set_xlabel("records"); left.set_ylabel("seconds")
    left.legend(fontsize=7)
    right.plot(records, [r["peak_rss"] / 2**20 for r in rows], "o-", label="peak RSS, runner + kernel")
    right.axhline(RSS_TARGET / 2**20, color="red", lw=0.8, label=f"target at 1M: {RSS_TARGET / 2**20:.0f} MiB")
    right.set_xscale("log"); right.set_xlabel("records"); right.set_ylabel("MiB"); right.legend(fontsize=7)
    fig.suptitle(f"countries-medallion, {info['when']}: {info['cpus']} CPUs, load {info['load_average_1_5_15']}",
                 fontsize=9)
    fig.tight_layout()
    png = where / "scale.png"
    fig.savefig(png, dpi=110)
    (where / "scale.json").write_text(json.dumps({"machine": info, "comparison_250": comparison_, "curve": rows},
                                                 indent=2) + "\n")
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-records", type=int, default=25_000,
                        help="largest size of the scale curve (250, 25000, 250000, 1000000; default 25000)")
    parser.add_argument("--repeats", type=int, default=3, help="paired runs of the 250-record comparison (default 3)")
    parser.add_argument("--only", choices=["pipeline", "micro"], help="only the whole-run or the per-step figures")
    parser.add_argument("--scale", type=int, default=40, help="copies of the snapshot for the per-step figures (default 40)")
    parser.add_argument("--port-base", type=int, default=18930, help="ports of the private stack (default 18930)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results", help="where the plot goes")
    args = parser.parse_args()
    info = machine()
    print(f"machine: {info['cpus']} CPUs, {info['system']}, Python {info['python']}, "
          f"load average {info['load_average_1_5_15']} at {info['when']}")

    if args.only != "micro":
        bench = Bench(args.port_base)
        try:
            compared = comparison(bench, args.repeats)
            rows = curve(bench, [n for n in CURVE if n <= args.max_records])
            if args.max_records >= 25_000:  # `make bench` and more
                memory(bench, next((r for r in rows if r["records"] >= 1_000_000), None))
        finally:
            bench.close()
        print(f"  plot: {plot(rows, compared, args.results)}")
        print(f"load average after the runs: {[round(x, 2) for x in os.getloadavg()]}")
    if args.only == "pipeline":
        return

    print("\n4. per-step figures")
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
