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
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path

from lib import lineage, names, registry
from lib.config import Settings
from lib.errors import PipelineError


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_run_id(when: datetime | None = None) -> str:
    when = when or datetime.now(timezone.utc)
    return f"{when:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def runs_dir(where: Settings | Path) -> Path:
    """`outputs/runs`, given the settings or just the outputs folder (no services needed)."""
    return getattr(where, "outputs_dir", where) / "runs"


def run_dir(where: Settings | Path, run_id: str) -> Path:
    return runs_dir(where) / names.run_id(run_id)


def manifest_path(where: Settings | Path, run_id: str) -> Path:
    return run_dir(where, run_id) / "manifest.json"


def write_json(path: Path, data) -> None:
    """Write JSON atomically: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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


def resolve_run_id(settings: Settings, run_id: str, stage: str) -> str:
    """The run a notebook works on: the given id, a new one for ingest, else the latest run (so
    notebooks run one after another in JupyterLab share a run)."""
    if run_id:
        return names.run_id(run_id)
    if stage == registry.first().name:
        return new_run_id()
    latest = latest_run_id(settings)
    if latest is None:
        raise PipelineError(f"{stage} needs a run id: no run exists yet in {runs_dir(settings)}; "
                            f"run {registry.first().name} first or set run_id")
    return latest


def stage_path(settings: Settings, run_id: str, stage: str) -> Path:
    registry.get(stage)  # an unknown stage is refused
    return run_dir(settings, run_id) / "stages" / f"{stage}.json"


def read_stage(settings: Settings, run_id: str, stage: str) -> dict | None:
    return read_json(stage_path(settings, run_id, stage))


class StageRecord:
    """What one stage did, saved to `stages/<stage>.json` by the notebook as its last step."""

    def __init__(self, settings: Settings, run_id: str, stage: str, parameters: dict | None = None):
        self.settings = settings
        self.path = stage_path(settings, run_id, stage)
        self.data = {
            "stage": stage,
            "run_id": run_id,
            "started": now(),
            "parameters": parameters or {},
            "rows_in": None,
            "rows_out": None,
            "artifacts": [],
            "details": {},
        }

    def output(self, artifact) -> None:
        """Record an object or table written by the stage (an Artifact or a dict)."""
        self.data["artifacts"].append(artifact.to_dict() if hasattr(artifact, "to_dict") else dict(artifact))

    def update(self, rows_in: int | None = None, rows_out: int | None = None, **details) -> None:
        if rows_in is not None:
            self.data["rows_in"] = int(rows_in)
        if rows_out is not None:
            self.data["rows_out"] = int(rows_out)
        self.data["details"].update(details)

    def save(self) -> Path:
        self.data["finished"] = now()
        write_json(self.path, self.data)
        return self.path


@dataclass
class RunRecord:
    """`manifest.json`: the run as the runner saw it (status, stages with their attempts), with each
    stage's counts, objects and details copied from its stage record when it ends."""

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
    def open(cls, settings, run_id: str, stages: list[str], params: dict[str, dict]) -> "RunRecord":
        record = cls(settings, run_id)
        existing = read_json(record.path)
        if existing:
            record.data = existing
            record.data["status"] = "running"
            record.data.pop("preflight", None)
            record.data.setdefault("resumed", []).append(now())
            record.data["requested_stages"] = [s for s in registry.NAMES
                                               if s in set(record.data["requested_stages"]) | set(stages)]
            for s in stages:  # a stage run again takes this invocation's parameters
                record.data["parameters"][s] = params.get(s, {})
        else:
            record.data = {
                "run_id": run_id,
                "status": "running",
                "started": now(),
                "requested_stages": stages,
                "parameters": params,
                "stack": settings.describe(),
                "stages": {},
            }
        record.save()
        return record

    def save(self) -> None:
        write_json(self.path, self.data)

    def stage_started(self, stage: str) -> None:
        entry = self.data["stages"].setdefault(stage, {"attempts": []})
        entry.update(status="running", started=now(), ended=None, notebook=f"{stage}.ipynb")
        self.save()
        lineage.stage_started(self, stage)  # hook: OpenLineage START (never raises)

    def stage_ended(self, stage: str, status: str, seconds: float, error: str | None = None) -> None:
        entry = self.data["stages"][stage]
        entry.update(status=status, ended=now(), duration_s=round(seconds, 2))
        if error:
            entry["error"] = error
        else:
            entry.pop("error", None)
        stage_record = read_stage(self.settings, self.run_id, stage) if status == "succeeded" else None
        if stage_record:
            entry.update(rows_in=stage_record["rows_in"], rows_out=stage_record["rows_out"],
                         objects=stage_record["artifacts"], details=stage_record["details"])
        self.save()
        lineage.stage_ended(self, stage)  # hook: OpenLineage COMPLETE / FAIL / ABORT (never raises)

    def keep_attempt(self, stage: str) -> None:
        """Move an earlier attempt's executed notebook aside, so a rerun does not overwrite it."""
        entry = self.data["stages"].get(stage)
        executed = self.dir / f"{stage}.ipynb"
        if not entry or not executed.exists():
            return
        n = len(entry["attempts"]) + 1
        kept = self.dir / f"{stage}.attempt{n}.ipynb"
        executed.rename(kept)
        entry["attempts"].append({"notebook": kept.name, "status": entry.get("status"),
                                  "error": entry.get("error"), "started": entry.get("started")})

    def finish(self, status: str) -> None:
        self.data.update(status=status, ended=now())
        self.data["lineage"] = [
            {"stage": s, "from": src, "to": obj.get("uri")}
            for s, entry in self.data["stages"].items()
            for obj in entry.get("objects", []) for src in obj.get("inputs", [])
        ]
        checked = self.data["stages"].get(registry.reconciler().name, {}).get("details", {})
        if "reconciliation" in checked:
            self.data["reconciliation"] = checked["reconciliation"]
        self.save()

    def first_unfinished(self) -> int:
        stages = self.data["requested_stages"]
        for i, s in enumerate(stages):
            if self.data["stages"].get(s, {}).get("status") != "succeeded":
                return i
        return len(stages)
