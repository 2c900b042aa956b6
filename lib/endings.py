"""Runs that ended without saying so: a run whose process is gone is marked `abandoned`.

A run killed outright (SIGKILL, the machine lost, a kernel that died in JupyterLab) never writes its
verdict: its record would say `running` for ever. `sweep` is called by every command that reads the
runs (a new run and `--resume`, holding the pipeline lock; `runs`; `report`; the index) and marks such
a run:

- a run of the runner is abandoned when its runner process is gone (the record names host, pid and
  the process's start time), or at once when the sweeper holds the pipeline lock: no runner can be
  running without it. A kernel it left behind is stopped first, so nothing writes into the record
  after the verdict;
- a stage run from JupyterLab or papermill is abandoned when its kernel is gone and its record has
  not been written for ABANDONED_AFTER_S;
- a run recorded on another host, whose processes cannot be looked at from here, is abandoned once
  nothing was written to it for STALE_AFTER_S (or by the next run, through the lock).

Marking one: each stage record still `running` says `abandoned` and why, the manifest says
`abandoned` with what it wrote listed as unpublished (a run's objects are never the published ones
until its publish), the stages' OpenLineage runs are closed with ABORT, its reserved space is given
back, and an alert is sent as for a failed run. A run killed while its publish was under way, and
whose publish a later run finished, is `succeeded` instead. The caller renders the pages.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from lib import alerts, files, lineage, names, registry, runs

log = logging.getLogger(__name__)

ABANDONED_AFTER_S = 600
STALE_AFTER_S = 24 * 3600


def _idle_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _why(process: dict | None, what: str) -> str:
    if not process:
        return f"{what} ended without a verdict"
    return f"{what} (pid {process.get('pid')} on {process.get('host')}) ended without a verdict"


def _stop_orphan(process: dict | None) -> None:
    """A kernel whose runner is gone: stopped, so it writes nothing into the record after the verdict."""
    if runs.process_alive(process) and process["pid"] != os.getpid():
        try:
            os.kill(int(process["pid"]), signal.SIGKILL)
        except OSError:
            return
        log.warning("stopped kernel pid %s: its runner is gone", process["pid"])
        deadline = time.monotonic() + 5
        while runs.process_alive(process) and time.monotonic() < deadline:
            time.sleep(0.05)


def _running(outputs: Path, run_id: str) -> dict[str, tuple[dict, Path]]:
    """The stage records of a run that still say "running": stage → (record, its path)."""
    running = {}
    for stage in registry.NAMES:
        path = runs.stage_path(outputs, run_id, stage)
        record = runs.read_json(path)
        if isinstance(record, dict) and record.get("status") == "running":
            running[stage] = (record, path)
    return running


def stop_orphans(outputs: Path, run_id: str, running: dict | None = None) -> None:
    """Stop the kernels of a run's stages that still say "running" (`running`, when the caller read
    them already), their runner gone: what the sweep does to a run it marks, and what `--resume` does
    to the run it takes over (the sweep leaves the run holding the lock alone), before anything of the
    resumed run is written."""
    for record, _ in (_running(outputs, run_id) if running is None else running).values():
        _stop_orphan(record.get("process"))


def _runner_gone(manifest: dict, run_dir: Path, holding_lock: bool) -> str | None:
    """Why a runner's run still `running` is over, or None while it may go on."""
    process = manifest.get("process")
    if holding_lock:
        return _why(process, "the run's runner") + "; the next run found the pipeline lock free"
    alive = runs.process_alive(process)
    if alive is False:
        return _why(process, "the run's runner")
    if alive is None and _idle_s(run_dir / "manifest.json") >= STALE_AFTER_S:
        return _why(process, "the run's runner") + f"; nothing written for {STALE_AFTER_S // 3600} h"
    return None


def _stage_gone(record: dict, path: Path) -> str | None:
    """Why an interactive stage still `running` is over, or None while its kernel may go on."""
    process = record.get("process")
    alive = runs.process_alive(process)
    idle = _idle_s(path)
    if alive is False and idle >= ABANDONED_AFTER_S:
        return _why(process, "the stage's kernel") + f"; nothing written for {idle:.0f} s"
    if alive is None and idle >= STALE_AFTER_S:
        return _why(process, "the stage's kernel") + f"; nothing written for {idle / 3600:.0f} h"
    return None


def _mark(outputs: Path, run_id: str, stages: dict[str, str], status: str, why: str) -> dict:
    record = runs.RunRecord(outputs, run_id)
    record.data = runs.read_json(record.path) or {"run_id": run_id, "stages": {}}
    for stage, reason in stages.items():
        path = runs.stage_path(outputs, run_id, stage)
        data = runs.read_json(path) or {}
        data.update(status="abandoned", finished=runs.now(), error=f"abandoned: {reason}")
        runs.write_json(path, data)
    if record.data.get("origin", "runner") == "runner":
        record.data.update(ended=record.data.get("ended") or runs.now())
        if status == "abandoned":
            record.data["abandoned"] = why
        record.refresh(status)
    else:
        record.refresh()
    runs.release_reserve(record.dir)
    files.remove_leftovers(record.dir)  # a record or notebook its killed writer was writing
    started = {e["run"]["runId"] for e in lineage.read_events(record.dir) if e.get("eventType") == "START"}
    for stage in stages:
        attempt = len(record.data["stages"].get(stage, {}).get("attempts") or [])
        if lineage.run_uuid(run_id, stage, attempt) in started:  # killed before its START: nothing to close
            lineage.stage_ended(record, stage)  # ABORT, answering the START sent when the stage began
    alerts.after_run(record.data, record.dir)
    log.warning("run %s marked %s: %s", run_id, record.data.get("status"), why)
    return record.data


def sweep(outputs: Path, holding_lock: str | None = None) -> list[str]:
    """Mark every run that ended without a verdict (see the module); returns their run ids.
    `holding_lock`: the run id of the caller when it holds the pipeline lock (that run is skipped)."""
    base = runs.runs_dir(outputs)
    marked = []
    if not base.is_dir():
        return marked
    for run_dir in sorted(base.iterdir()):
        if not (run_dir.is_dir() and names.RUN_ID.match(run_dir.name)) or run_dir.name == holding_lock:
            continue
        manifest = runs.read_json(run_dir / "manifest.json")
        if not isinstance(manifest, dict):
            continue
        running = _running(outputs, run_dir.name)
        if manifest.get("origin", "runner") == "runner":
            if manifest.get("status") != "running":
                continue
            why = _runner_gone(manifest, run_dir, holding_lock is not None)
            if why is None:
                continue
            stop_orphans(outputs, run_dir.name, running)
            status = "succeeded" if _published_later(outputs, run_dir.name, manifest) else "abandoned"
            _mark(outputs, run_dir.name, {stage: why for stage in running}, status, why)
        else:
            gone = {stage: why for stage, (record, path) in running.items()
                    if (why := _stage_gone(record, path)) is not None}
            if not gone:
                continue
            _mark(outputs, run_dir.name, gone, "abandoned", "; ".join(gone.values()))
        marked.append(run_dir.name)
    return marked


def _published_later(outputs: Path, run_id: str, manifest: dict) -> bool:
    """A run killed during its publish, which a later run finished (lib/publish.py `finish_pending`):
    every stage it asked for succeeded, and its `published.json` lists what was published."""
    requested = manifest.get("requested_stages") or []
    records = {s: runs.read_stage(outputs, run_id, s) or {} for s in requested}
    return (bool(requested) and all(r.get("status") == "succeeded" for r in records.values())
            and bool(runs.published(outputs, run_id)))
