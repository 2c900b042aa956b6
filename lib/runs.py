"""Run ids, run folders and the records stages leave behind.

A run lives in `outputs/runs/<run_id>/`: the executed notebooks, `manifest.json` (written by the
runner) and `stages/<stage>.json` (written by each stage notebook: counts, artifacts with their
inputs, details). The stage records are what the manifest, lineage and reconciliation are built from.
"""

from __future__ import annotations

import json
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path

from lib import names
from lib.config import Settings

STAGES = ("01_ingest", "02_clean", "03_load", "04_export", "05_gold")


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
    if stage == STAGES[0]:
        return new_run_id()
    latest = latest_run_id(settings)
    if latest is None:
        raise ValueError(f"{stage} needs a run id: no run exists yet in {runs_dir(settings)}; "
                         "run 01_ingest first or set run_id")
    return latest


def stage_path(settings: Settings, run_id: str, stage: str) -> Path:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
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
