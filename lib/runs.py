"""Everything about a run's record: run ids, run folders, the stage records and the manifest.

A run lives in `outputs/runs/<run_id>/`: the executed notebooks, `manifest.json` (`RunRecord`,
written by the runner) and `stages/<stage>.json` (`StageRecord`, written by each stage notebook:
counts, artifacts with their inputs, details). The stage records are what the manifest, lineage and
reconciliation are built from.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from lib import files, hints, names, registry
from lib.config import Settings
from lib.errors import EXIT_USAGE, PipelineError


RUNNER_ENV = "MEDALLION_RUNNER_RUN"  # set by the runner for the kernels it starts: the run id
# How a run or a stage can end without succeeding (the runner's verdicts, and `lib/endings.py`'s).
ENDED_BADLY = ("failed", "interrupted", "abandoned")
# Interactive run ids say where they came from: lab-20261128T184700Z-3fa2c1, papermill-…
INTERACTIVE_PREFIX = {"jupyterlab": "lab", "papermill": "papermill"}


class RecordClosed(PipelineError):
    """A notebook outside the runner named a run the runner recorded: its record is never rewritten."""

    exit_code = EXIT_USAGE


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def origin() -> str:
    """Who is executing this process's stage: the runner (it sets RUNNER_ENV for its kernels),
    JupyterLab (its sessions give kernels JPY_SESSION_NAME), or anything else executing the notebook
    (plain papermill, nbclient, a script): "papermill"."""
    if os.environ.get(RUNNER_ENV):
        return "runner"
    if os.environ.get("JPY_SESSION_NAME"):
        return "jupyterlab"
    return "papermill"


def new_run_id(when: datetime | None = None, origin: str = "runner") -> str:
    when = when or datetime.now(timezone.utc)
    lead = f"{INTERACTIVE_PREFIX[origin]}-" if origin in INTERACTIVE_PREFIX else ""
    return f"{lead}{when:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


# While a run goes, its folder holds this much space in `.reserve`, given up when the disk fills so
# that the run's final record (the manifest and the failed stage's record) can still be written.
RESERVE_FILE = ".reserve"
RESERVE_BYTES = 1 << 20


def this_process(pid: int | None = None) -> dict:
    """Who writes a record (this process, or process `pid` of this host): host, pid and the
    process's start time (a pid can be used again)."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "since": round(psutil.Process(pid).create_time(), 2)}


def process_alive(process: dict | None) -> bool | None:
    """Whether a recorded process still runs: None when that cannot be told from here (another
    host, or no process recorded)."""
    if not process or process.get("host") != socket.gethostname() or not process.get("pid"):
        return None
    try:
        found = psutil.Process(int(process["pid"]))
        if found.status() == psutil.STATUS_ZOMBIE:
            return False
        since = process.get("since")
        return since is None or abs(found.create_time() - float(since)) < 1
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return None


def hold_reserve(run_dir: Path) -> None:
    """Set aside RESERVE_BYTES in the run folder for its final record (see RESERVE_FILE)."""
    files.write(run_dir / RESERVE_FILE, bytes(RESERVE_BYTES))


def release_reserve(run_dir: Path) -> bool:
    """Give the reserved space back; False when there was none."""
    try:
        (run_dir / RESERVE_FILE).unlink()
    except FileNotFoundError:
        return False
    return True


def write_verdict(run_dir: Path, path: Path, data) -> None:
    """Write a record the runner must be able to write whatever happened: on a full disk, the run's
    reserve is given up and the write tried once more."""
    try:
        write_json(path, data)
    except OSError as err:
        if not (files.is_no_space(err) and release_reserve(run_dir)):
            raise
        write_json(path, data)


def runs_dir(where: Settings | Path) -> Path:
    """`outputs/runs`, given the settings or just the outputs folder (no services needed)."""
    return getattr(where, "outputs_dir", where) / "runs"


def run_dir(where: Settings | Path, run_id: str) -> Path:
    return runs_dir(where) / names.run_id(run_id)


def manifest_path(where: Settings | Path, run_id: str) -> Path:
    return run_dir(where, run_id) / "manifest.json"


PUBLISHED_FILE = "published.json"  # in a run folder: what its publish made current, written once


def published(where: Settings | Path, run_id: str) -> list[str]:
    """The `latest` URIs a run's publish moved to it ([] when it was never published)."""
    found = read_json(run_dir(where, run_id) / PUBLISHED_FILE)
    return list(found.get("published") or []) if isinstance(found, dict) else []


def json_bytes(data) -> bytes:
    """A record's bytes as every record file holds them."""
    text = json.dumps(data, indent=2, default=str, ensure_ascii=False)
    try:
        body = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate somewhere: JSON escapes keep it exactly
        body = json.dumps(data, indent=2, default=str, ensure_ascii=True).encode("ascii")
    return body + b"\n"


def write_json(path: Path, data) -> None:
    """Write JSON whole or not at all (lib/files.py): readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write(path, json_bytes(data))


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def latest_run_id(settings: Settings) -> str | None:
    """The most recently started run that has a record in outputs/runs."""
    base = runs_dir(settings)
    if not base.is_dir():
        return None
    candidates = [p for p in base.iterdir() if p.is_dir() and names.RUN_ID.match(p.name)]
    if not candidates:
        return None
    return max(candidates, key=lambda p: (p / "stages").stat().st_mtime if (p / "stages").exists()
               else p.stat().st_mtime).name


def run_origin(settings: Settings, run_id: str) -> str | None:
    """Who started a run ("runner", "jupyterlab", "papermill"), None when it has no record yet. A
    manifest without an origin was written by the runner before origins were recorded."""
    manifest = read_json(manifest_path(settings, run_id))
    if manifest is None:
        return None
    return manifest.get("origin", "runner")


_KERNEL_RUN: list[str] = []  # this process's interactive run: one per kernel session


def resolve_run_id(settings: Settings, run_id: str, stage: str) -> str:
    """The run a stage writes into.

    Under the runner: the run it passes (RUNNER_ENV and `run_id` must agree).
    Outside it (JupyterLab, papermill, nbclient), a finished run's record is never touched:
    - an empty run_id gives this kernel session's own run, started by its first stage: `lab-…` in
      JupyterLab (one run per notebook kernel), `papermill-…` otherwise (one run per execution).
      A stage whose run did not execute the stage before reads another run's data (`based_on`:
      the `input_run` parameter, else the latest published run);
    - a named run is used when it is interactive (or new, at the first stage); a run the runner
      recorded is refused with how to re-run a stage through the runner.
    New interactive runs get their manifest from `open_interactive`."""
    runner_run = os.environ.get(RUNNER_ENV)
    if runner_run:
        names.run_id(runner_run)
        if run_id and run_id != runner_run:
            raise PipelineError(f"{stage}: run_id {run_id!r} differs from the runner's run {runner_run!r}")
        return runner_run
    if run_id:
        names.run_id(run_id)
        found = run_origin(settings, run_id)
        if found == "runner":
            raise RecordClosed(
                f"run {run_id} was recorded by the runner and its record is never rewritten from a notebook. "
                f"To run {stage} again in that run (the earlier attempt is kept): "
                f"`{run_again(settings, run_id, [stage])}`. To explore its data, leave run_id empty and set "
                f"input_run = {run_id!r}: the notebook starts its own run that reads run {run_id}'s data")
        return run_id
    if not _KERNEL_RUN:
        _KERNEL_RUN.append(new_run_id(origin=origin()))
    return _KERNEL_RUN[0]


def run_again(settings: Settings, run_id: str, stages: list[str]) -> str:
    """The command that runs `stages` (in order, consecutive) of a recorded run again through the
    runner, with the parameters the run gave them (a stage run again takes the command's own)."""
    numbers = [registry.get(s).number for s in stages]
    spec = str(numbers[0]) if len(numbers) == 1 else f"{numbers[0]}-{numbers[-1]}"
    recorded = (read_json(manifest_path(settings, run_id)) or {}).get("parameters") or {}
    given: dict[str, str] = {}
    for stage in stages:
        for key, value in (recorded.get(stage) or {}).items():
            given.setdefault(key, str(value).lower() if isinstance(value, bool) else str(value))
    return hints.command("--stages", spec, "--run-id", run_id,
                         *(arg for key, value in given.items() for arg in ("-p", f"{key}={value}")))


def based_on(settings: Settings, run_id: str) -> str | None:
    """The run whose earlier stages' data a run reads when it did not execute them (None: its own)."""
    return (read_json(manifest_path(settings, run_id)) or {}).get("based_on")


def needs_base(settings: Settings, run_id: str, stage: str) -> bool:
    """Whether an interactive run about to run `stage` may need to be told which run's data it reads:
    a new run whose first stage is not the first stage."""
    return (not os.environ.get(RUNNER_ENV) and stage != registry.first().name
            and not manifest_path(settings, run_id).exists())


def open_interactive(settings: Settings, run_id: str, stage: str, base: str | None = None,
                     parameters: dict | None = None) -> None:
    """The manifest of a run started outside the runner: written at its first stage (where it came
    from and, when that is not the first stage, `base`: the run it reads from), then each stage it
    begins is added to its requested stages, with its parameters."""
    if os.environ.get(RUNNER_ENV):
        return
    record = RunRecord(settings, run_id, read_json(manifest_path(settings, run_id)) or {})
    if not record.data:
        record.data = {
            "run_id": run_id, "origin": origin(), "status": "running", "started": now(), "based_on": base,
            "requested_stages": [], "parameters": {}, "stack": settings.describe(), "stages": {}}
        if os.environ.get("JPY_SESSION_NAME"):
            record.data["notebook_session"] = os.environ["JPY_SESSION_NAME"]
    elif base and record.data.get("based_on") not in (None, base):
        raise PipelineError(f"run {run_id} reads the data of run {record.data['based_on']}, not {base}: leave "
                            "input_run empty, or restart the kernel for a new run")
    asked = set(record.data.get("requested_stages") or []) | {stage}
    record.data["requested_stages"] = [s for s in registry.NAMES if s in asked]
    record.data.setdefault("parameters", {})[stage] = parameters or {}
    record.data["status"] = "running"
    record.data.pop("ended", None)
    record.save()


def stage_path(settings: Settings, run_id: str, stage: str) -> Path:
    registry.get(stage)  # an unknown stage is refused
    return run_dir(settings, run_id) / "stages" / f"{stage}.json"


def read_stage(settings: Settings, run_id: str, stage: str) -> dict | None:
    return read_json(stage_path(settings, run_id, stage))


def attempt_paths(settings: Settings, run_id: str, stage: str) -> list[Path]:
    """The records of a stage's earlier executions in a run, oldest first."""
    folder = stage_path(settings, run_id, stage).parent
    found = [(int(p.name[len(stage) + len(".attempt"):-len(".json")]), p)
             for p in folder.glob(f"{stage}.attempt*.json") if p.name[len(stage) + 8:-5].isdigit()]
    return [p for _, p in sorted(found)]


def keep_attempt(settings: Settings, run_id: str, stage: str) -> int | None:
    """Move a stage's current record (and the runner's executed notebook of it) aside as attempt N,
    so executing the stage again never overwrites what the earlier execution recorded. Returns N."""
    path = stage_path(settings, run_id, stage)
    record = read_json(path)
    if record is None:
        return None
    n = len(attempt_paths(settings, run_id, stage)) + 1
    if record.get("status") == "running":  # its process ended without saying how
        record.update(status="abandoned", finished=record.get("finished") or now())
    executed = run_dir(settings, run_id) / f"{stage}.ipynb"
    if record.get("notebook") == executed.name and executed.exists():
        kept = executed.with_name(f"{stage}.attempt{n}.ipynb")
        executed.rename(kept)
        record["notebook"] = kept.name
    write_json(path.with_name(f"{stage}.attempt{n}.json"), record)
    path.unlink()
    return n


class StageRecord:
    """What one execution of a stage did, in `stages/<stage>.json`: written when the stage starts,
    kept up to date as it writes objects (so a failed stage still lists them), and marked succeeded
    by `save()`, the notebook's last step. An earlier execution's record is kept as
    `stages/<stage>.attemptN.json` (`keep_attempt`); the manifest is derived from these files."""

    def __init__(self, settings: Settings, run_id: str, stage: str, parameters: dict | None = None):
        self.settings = settings
        self.run_id = run_id
        self.stage = stage
        self.path = stage_path(settings, run_id, stage)
        self.data = {
            "stage": stage,
            "run_id": run_id,
            "status": "running",
            "origin": origin(),
            "started": now(),
            "process": this_process(),
            "parameters": parameters or {},
            "rows_in": None,
            "rows_out": None,
            "artifacts": [],
            "details": {},
        }

    def start(self) -> "StageRecord":
        """Begin this execution's record. The runner writes a record when it starts a stage; the
        kernel it starts takes that one over. Any other earlier record becomes an attempt."""
        existing = read_json(self.path)
        if (existing and existing.get("status") == "running" and existing.get("origin") == "runner"
                and self.data["origin"] == "runner"):
            for name in ("started", "notebook", "attempt"):
                if name in existing:
                    self.data[name] = existing[name]
        else:
            keep_attempt(self.settings, self.run_id, self.stage)
        self._write()
        return self

    def _write(self) -> None:
        write_json(self.path, self.data)

    def output(self, artifact) -> None:
        """Record an object or table written by the stage (an Artifact or a dict)."""
        self.data["artifacts"].append(artifact.to_dict() if hasattr(artifact, "to_dict") else dict(artifact))
        self._write()

    def update(self, rows_in: int | None = None, rows_out: int | None = None, **details) -> None:
        if rows_in is not None:
            self.data["rows_in"] = int(rows_in)
        if rows_out is not None:
            self.data["rows_out"] = int(rows_out)
        self.data["details"].update(details)
        self._write()

    def fail(self, error: str) -> None:
        self.data.update(status="failed", error=error, finished=now())
        self._write()

    def save(self) -> Path:
        self.data.update(status="succeeded", finished=now())
        self.data.pop("error", None)
        self._write()
        return self.path


def _entry(record: dict) -> dict:
    """A stage record as the manifest shows it."""
    entry = {"status": record.get("status", "succeeded"), "origin": record.get("origin"),
             "started": record.get("started"), "ended": record.get("finished"),
             "duration_s": record.get("duration_s"), "notebook": record.get("notebook"),
             "rows_in": record.get("rows_in"), "rows_out": record.get("rows_out"),
             "objects": record.get("artifacts", []), "details": record.get("details", {})}
    if record.get("error"):
        entry["error"] = record["error"]
    return entry


def derive_stages(settings: Settings, run_id: str) -> dict:
    """The manifest's `stages`, built only from the stage records: each stage's current execution
    and, under `attempts`, every earlier one."""
    out = {}
    for stage in registry.NAMES:
        record = read_stage(settings, run_id, stage)
        earlier = attempt_paths(settings, run_id, stage)
        if record is None and not earlier:
            continue
        # Between moving an attempt aside and starting the next one, the stage has no current record.
        entry = _entry(record) if record is not None else {"status": "pending"}
        entry["attempts"] = []
        for n, path in enumerate(earlier, start=1):
            earlier = read_json(path)
            entry["attempts"].append({"attempt": n, "record": f"stages/{path.name}",
                                      **{k: v for k, v in _entry(earlier).items() if k not in ("objects", "details")}})
        out[stage] = entry
    return out


@dataclass
class RunRecord:
    """`manifest.json`: the run as a whole (who started it, status, parameters, the stack), with its
    stages derived from the stage records (`derive_stages`), so the two can never disagree."""

    settings: Settings
    run_id: str
    data: dict = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return run_dir(self.settings, self.run_id)

    @property
    def path(self) -> Path:
        return manifest_path(self.settings, self.run_id)

    @classmethod
    def open(cls, settings, run_id: str, stages: list[str], params: dict[str, dict],
             based_on: str | None = None) -> "RunRecord":
        """The runner's record of a run, new or resumed. `based_on`: the run whose data a new run
        that starts after the first stage reads (lib/stages/context.py `source_run`)."""
        record = cls(settings, run_id)
        existing = read_json(record.path)
        if existing:
            record.data = existing
            record.data["status"] = "running"
            record.data["process"] = this_process()
            for gone in ("preflight", "ended", "abandoned", "error"):
                record.data.pop(gone, None)
            record.data.setdefault("resumed", []).append(now())
            record.data["requested_stages"] = [s for s in registry.NAMES
                                               if s in set(record.data["requested_stages"]) | set(stages)]
            for s in stages:  # a stage run again takes this invocation's parameters
                record.data["parameters"][s] = params.get(s, {})
        else:
            record.data = {
                "run_id": run_id,
                "origin": "runner",
                "status": "running",
                "started": now(),
                "process": this_process(),
                "requested_stages": stages,
                "parameters": params,
                "stack": settings.describe(),
                "based_on": based_on,
                "stages": {},
            }
        record.save()
        return record

    def save(self) -> None:
        write_verdict(self.dir, self.path, self.data)

    def refresh(self, status: str | None = None) -> None:
        """Rebuild everything derived from the stage records: stages with their attempts, lineage,
        the reconciliation table (passed or failed) and what was (not) published."""
        if not self.data:
            self.data = read_json(self.path) or {"run_id": self.run_id, "origin": origin(), "stages": {}}
        stages = derive_stages(self.settings, self.run_id)
        self.data["stages"] = stages
        if status is None and self.data.get("origin", "runner") != "runner":
            # An interactive run has no end: its status is its stages' status.
            states = [e["status"] for e in stages.values()]
            status = ("running" if "running" in states else "abandoned" if "abandoned" in states
                      else "failed" if set(states) - {"succeeded"} else "succeeded")
        if status is not None:
            self.data["status"] = status
        self.data["lineage"] = [
            {"stage": s, "from": src, "to": obj.get("uri")}
            for s, entry in stages.items()
            for obj in entry.get("objects", []) for src in obj.get("inputs", [])
        ]
        checked = stages.get(registry.reconciler().name, {}).get("details", {})
        if "reconciliation" in checked:
            self.data["reconciliation"] = checked["reconciliation"]
            if checked.get("reconciliation_error"):
                self.data["reconciliation_error"] = checked["reconciliation_error"]
            else:
                self.data.pop("reconciliation_error", None)
        done = published(self.settings, self.run_id)
        objects = [o["uri"] for e in stages.values() for o in e.get("objects", [])
                   if str(o.get("uri", "")).startswith("s3://")]
        self.data["published"] = done
        # Objects nobody should take for this run's proven result: all of them until it has published.
        self.data["unpublished"] = [] if done else objects
        self.save()

    def stage_started(self, stage: str, kernel: dict | None = None) -> None:
        """The runner starts a stage: an earlier execution's record becomes an attempt, and a new
        record says the stage is running (the kernel takes it over in `context.begin`). `kernel`: the
        process that will run it, when the runner started it (`this_process(pid)`)."""
        keep_attempt(self.settings, self.run_id, stage)
        record = StageRecord(self.settings, self.run_id, stage, self.data.get("parameters", {}).get(stage, {}))
        record.data.update(origin="runner", notebook=f"{stage}.ipynb")
        if kernel:
            record.data["process"] = kernel
        record._write()
        self.refresh()

    def stage_ended(self, stage: str, status: str, seconds: float, error: str | None = None) -> None:
        """The runner's verdict on a stage, written into its record (the record the notebook left,
        with its objects and details), then the manifest derived again."""
        path = stage_path(self.settings, self.run_id, stage)
        record = read_json(path) or {"stage": stage, "run_id": self.run_id, "artifacts": [], "details": {}}
        record.update(status=status, duration_s=round(seconds, 2), finished=record.get("finished") or now())
        if status != "succeeded" or not record.get("finished"):
            record["finished"] = now()
        if error:
            record["error"] = error
        else:
            record.pop("error", None)
        write_verdict(self.dir, path, record)
        self.refresh()

    def keep_attempt(self, stage: str) -> None:
        """Move an earlier attempt's record and executed notebook aside (see `keep_attempt`)."""
        keep_attempt(self.settings, self.run_id, stage)
        self.refresh()

    def finish(self, status: str) -> None:
        self.data.update(ended=now())
        self.refresh(status)
        release_reserve(self.dir)

    def first_unfinished(self) -> int:
        stages = self.data["requested_stages"]
        for i, s in enumerate(stages):
            if self.data["stages"].get(s, {}).get("status") != "succeeded":
                return i
        return len(stages)
