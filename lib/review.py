"""What the run records say, across runs: one summary per run (for the index page and `run_pipeline.py
runs`) and the difference between the gold tables of any two runs (`run_pipeline.py diff A B`).

Summaries are read from `outputs/runs/<id>/manifest.json` only (no service needed); a diff reads the
two gold tables from the gold bucket, or the runs' exports from the cloud bucket when gold is missing.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from lib import changes, formats, layout, names, registry, runs, storage, terminal
from lib.errors import PipelineError
from lib.registry import Layer
from lib.stages import parameters

# Each stage and the label of what it writes: the index's row counts by layer.
LAYERS = {s.name: s.writes[0].label for s in registry.STAGES}
INGEST, CLEAN, GOLD = (registry.writer_of(layer).name for layer in (Layer.RAW, Layer.QUARANTINE, Layer.GOLD))
# What each stage publishes: said for a run that ended before the stage succeeded.
PUBLISHES = {s.name: s.title for s in registry.STAGES}


def _seconds(start: str | None, end: str | None) -> float | None:
    try:
        return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 1)
    except (TypeError, ValueError):
        return None


def summary(manifest: dict, run_dir: Path | None = None) -> dict:
    """One run in a few plain fields: what the index and the `runs` table show."""
    stages = manifest.get("stages", {})
    details = {s: (stages.get(s) or {}).get("details") or {} for s in registry.NAMES}
    changes = details[GOLD].get("changes") or {}
    failed = next(({"stage": s, "error": e.get("error", "")} for s, e in stages.items()
                   if e.get("status") in runs.ENDED_BADLY), None)
    requested = manifest.get("requested_stages", [])
    unpublished = [s for s in requested if (stages.get(s) or {}).get("status") != "succeeded"]
    durations = {s: e.get("duration_s") for s, e in stages.items() if e.get("duration_s") is not None}
    notebooks = sorted(p.name for p in run_dir.glob("*.ipynb")) if run_dir and run_dir.is_dir() else []
    return {
        "run_id": manifest.get("run_id", run_dir.name if run_dir else "?"),
        "started": manifest.get("started"),
        "ended": manifest.get("ended"),
        "origin": manifest.get("origin") or "runner",
        "status": manifest.get("status", "?"),
        "source": details[INGEST].get("origin"),  # "api", "snapshot" or None (stage 1 not run)
        "fallback_reason": details[INGEST].get("fallback_reason"),
        "attempts": len(details[INGEST].get("attempts") or []),
        "rows": {layer: (stages.get(s) or {}).get("rows_out") for s, layer in LAYERS.items()},
        "quarantined": details[CLEAN].get("quarantined"),
        "added": changes.get("added"),
        "removed": changes.get("removed"),
        "changed": changes.get("changed"),
        "previous_run_id": details[GOLD].get("previous_run_id"),
        "duration_s": _seconds(manifest.get("started"), manifest.get("ended"))
        if manifest.get("ended") else (round(sum(durations.values()), 1) if durations else None),
        "stage_seconds": durations,
        "requested_stages": requested,
        "failed": failed,
        "unpublished": unpublished if manifest.get("status") != "running" else [],
        "by_region": details[GOLD].get("by_region") or {},
        "notebooks": notebooks,
        "report": (run_dir / "report.html").exists() if run_dir else False,
    }


def summaries(outputs: Path) -> list[dict]:
    """Every run under `outputs/runs`, newest first (by start time, then by id)."""
    base = runs.runs_dir(outputs)
    found = []
    if base.is_dir():
        for path in base.iterdir():
            if not (path.is_dir() and names.RUN_ID.match(path.name)):
                continue
            manifest = runs.read_json(path / "manifest.json")
            if isinstance(manifest, dict):
                found.append(summary(manifest, path))
    return sorted(found, key=lambda s: (s["started"] or "", s["run_id"]), reverse=True)


# --- a run named on the command line -----------------------------------------------------------------

class UnknownRun(names.InvalidName):
    """A name that is no run, or a short id that fits several; the message says which (exit 2)."""


def find_run(outputs: Path, name: str) -> str:
    """The full id of the run `name` names: a run id, or the end of one as the index's trend pictures
    label runs (`a1b2c3`, lib/charts.py), or its beginning (`20261128T0554`) — when exactly one run
    under `outputs/runs` fits. `diff` and `report` take their runs through this."""
    names.run_id(name)
    base = runs.runs_dir(outputs)
    if (base / name).is_dir():
        return name
    ids = sorted(p.name for p in base.iterdir() if p.is_dir() and names.RUN_ID.match(p.name)) if base.is_dir() else []
    fitting = [i for i in ids if i.endswith(name) or i.startswith(name)]
    if not fitting:
        raise UnknownRun(f"no such run: {name} (`run_pipeline.py runs` lists them)")
    if len(fitting) > 1:
        raise UnknownRun(f"{name} names more than one run: {', '.join(fitting)}")
    return fitting[0]


# --- the terminal table -------------------------------------------------------------------------------

def _n(value) -> str:
    return "-" if value is None else str(value)


def runs_table(rows: list[dict]) -> str:
    """`run_pipeline.py runs`: one line per run, newest first, what the records say escaped for the
    terminal (lib/terminal.py)."""
    head = ["run", "started (UTC)", "how", "status", "source", *LAYERS.values(), "quar", "+", "-", "~", "secs"]
    lines = []
    for s in rows:
        source = {"api": "API", "snapshot": "SNAPSHOT!"}.get(s["source"], "-")
        lines.append([terminal.safe(v) for v in (
            s["run_id"], (s["started"] or "")[:19].replace("T", " "), s["origin"], s["status"], source,
            *(_n(s["rows"][layer]) for layer in LAYERS.values()), _n(s["quarantined"]),
            _n(s["added"]), _n(s["removed"]), _n(s["changed"]), _n(s["duration_s"]))])
    if not lines:
        return "no runs yet (outputs/runs is empty): start one with `make run`"
    widths = [max(len(str(r[i])) for r in [head, *lines]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def runs_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2, ensure_ascii=False, default=str)


# --- diff between two runs ----------------------------------------------------------------------------

class DiffError(PipelineError):
    """A run's data cannot be found; the message names the run and where it was looked for."""


def gold_table(settings, run_id: str):
    """The gold table a run wrote (its export when gold is missing), as a DataFrame, and its URI."""
    names.run_id(run_id)
    manifest = runs.read_json(runs.manifest_path(settings, run_id)) or {}
    gold_stage = registry.writer_of(Layer.GOLD).name
    table = (manifest.get("parameters", {}).get(gold_stage) or {}).get("table") or parameters.DEFAULT_TABLE
    names.sql_identifier(table, "table")
    s3 = storage.client(settings.store)
    # Where the run's record says its gold table is; else where the layout puts it now.
    recorded = ((manifest.get("stages", {}).get(gold_stage) or {}).get("details") or {}).get("gold_key")
    places = [(s3, settings.gold_bucket, key) for key in
              ([recorded] if recorded else []) + [layout.gold_table_key(table, run_id, fmt.extension)
                                                  for fmt in formats.FORMATS.values()]]
    places.append((storage.cloud_client(settings.cloud), settings.cloud.bucket,
                   layout.export_key(settings.cloud.prefix, table, run_id)))
    for client, bucket, key in places:
        if storage.head(client, bucket, key) is not None:
            data, _ = storage.get_bytes(client, bucket, key)
            return formats.of_key(key).decode(data), f"s3://{bucket}/{key}"
    looked = ", ".join(f"s3://{b}/{k}" for _, b, k in places)
    raise DiffError(f"run {run_id} has no gold table nor export (looked for {looked})")


def diff(settings, a: str, b: str) -> dict:
    """Countries added, removed and changed (field: [old, new]) from run A's gold to run B's."""
    old, old_uri = gold_table(settings, a)
    new, new_uri = gold_table(settings, b)
    report = changes.of_frames(old, new, a)
    return {"from": a, "to": b, "from_uri": old_uri, "to_uri": new_uri, **report}


def diff_text(report: dict) -> str:
    """The diff for the terminal: one line per key and per changed field, each escaped (lib/terminal.py)."""
    lines = [f"{report['from']} → {report['to']}: {len(report['added'])} added, "
             f"{len(report['removed'])} removed, {len(report['changed'])} changed",
             f"  from {report['from_uri']}", f"  to   {report['to_uri']}"]
    lines += [f"+ {k}" for k in report["added"]]
    lines += [f"- {k}" for k in report["removed"]]
    for key, fields in report["changed"].items():
        lines.append(f"~ {key}")
        lines += [f"    {f}: {json.dumps(o, ensure_ascii=False)} → {json.dumps(n, ensure_ascii=False)}"
                  for f, (o, n) in fields.items()]
    return "\n".join(map(terminal.safe, lines))
