"""Running the stage notebooks with papermill: argument checks, preflight, the run record, resume.

`run_pipeline.py` is the command line over this module.
"""

from __future__ import annotations

import logging
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from lib import config, db, names, runs, source, stack, storage

log = logging.getLogger(__name__)

NOTEBOOKS = config.ROOT / "notebooks"
STAGE_NUMBERS = {i + 1: name for i, name in enumerate(runs.STAGES)}
EXIT_USAGE, EXIT_FAILED, EXIT_LOCKED, EXIT_INTERRUPTED = 2, 1, 3, 130
# Values checked beyond their type, so a bad one is refused before any kernel starts.
PARAM_CHECKS = {
    "db_schema": lambda v: names.sql_identifier(v, "schema"),
    "table": lambda v: names.sql_identifier(v, "table"),
    "write_mode": lambda v: v if v in db.WRITE_MODES else _bad(f"write_mode {v!r} is not one of {', '.join(db.WRITE_MODES)}"),
    "backfill_date": lambda v: v if v == "" or re.match(r"^\d{4}-\d{2}-\d{2}$", v) else _bad(f"backfill_date {v!r} is not YYYY-MM-DD"),
    "snapshot_fallback": lambda v: v if v in ("auto", "true", "false") else _bad(f"snapshot_fallback {v!r} is not auto, true or false"),
    "api_url": lambda v: v if v == "" else source.check_url(v),
    "max_invalid_fraction": lambda v: v if 0 <= v <= 1 else _bad(f"max_invalid_fraction {v} is not between 0 and 1"),
    "min_records": lambda v: v if v >= 1 else _bad(f"min_records {v} must be at least 1"),
    "max_attempts": lambda v: v if v >= 1 else _bad(f"max_attempts {v} must be at least 1"),
    "preview_rows": lambda v: v if v >= 0 else _bad(f"preview_rows {v} must not be negative"),
    **{k: (lambda v, k=k: v if v > 0 else _bad(f"{k} {v} must be more than 0"))
       for k in ("connect_timeout", "read_timeout", "max_total_seconds")},
}


class UsageError(ValueError):
    """A bad command line: exit 2 before anything runs."""


def _bad(message: str):
    raise UsageError(message)


def parse_stages(spec: str) -> list[str]:
    """'1-5', '2-4', '3', '1,3,5' → stage names, in pipeline order."""
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise UsageError(f"--stages {spec!r}: {part!r} is not a stage number or a range like 2-4")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if first > last:
            raise UsageError(f"--stages {spec!r}: range {part} runs backwards")
        for n in range(first, last + 1):
            if n not in STAGE_NUMBERS:
                raise UsageError(f"--stages {spec!r}: there is no stage {n} (stages are 1-{len(STAGE_NUMBERS)})")
            chosen.add(n)
    return [STAGE_NUMBERS[n] for n in sorted(chosen)]


def notebook_parameters(stage: str) -> dict:
    import papermill

    return papermill.inspect_notebook(str(NOTEBOOKS / f"{stage}.ipynb"))


def _convert(key: str, raw: str, type_name: str):
    try:
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        if type_name == "bool":
            lowered = raw.strip().lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError
    except ValueError:
        raise UsageError(f"-p {key}={raw!r}: expected a value of type {type_name}") from None
    return raw


def parse_params(pairs: list[str], stages: list[str]) -> dict[str, dict]:
    """-p KEY=VALUE pairs → {stage: {key: typed value}} for the chosen stages that declare KEY."""
    declared = {s: notebook_parameters(s) for s in stages}
    out: dict[str, dict] = {s: {} for s in stages}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"-p {pair!r}: use KEY=VALUE")
        if key == "run_id":
            raise UsageError("-p run_id: use --run-id")
        takers = [s for s in stages if key in declared[s]]
        if not takers:
            known = sorted({k for d in declared.values() for k in d} - {"run_id"})
            raise UsageError(f"-p {key}: no chosen stage has a parameter {key!r}; known: {', '.join(known)}")
        for s in takers:
            value = _convert(key, raw, declared[s][key]["inferred_type_name"])
            if key in PARAM_CHECKS:
                try:
                    PARAM_CHECKS[key](value)
                except (names.InvalidName, source.SourceError) as err:
                    raise UsageError(f"-p {key}: {err}") from None
            out[s][key] = value
    return out


# --- preflight -------------------------------------------------------------------------------------

def preflight(settings: config.Settings, stages: list[str], api_url: str | None = None) -> list[str]:
    """Check that every service the chosen stages need answers. Returns the problems (empty: go)."""
    import requests

    problems: list[str] = []
    if "01_ingest" in stages:
        url = api_url or settings.api_url
        try:
            source.check_url(url)
            with requests.get(url, timeout=(5, 30), stream=True) as response:
                if 400 <= response.status_code < 500 and response.status_code != 429:
                    # A request the API rejects will not get better by retrying: say so now, verbatim.
                    problems.append(f"API {url} answered HTTP {response.status_code}: {response.text[:500]}")
        except source.SourceError as err:
            problems.append(f"API: {err}")
        except requests.Timeout as err:
            log.warning("preflight: API %s is slow to answer (%s); stage 1 will wait and retry", url, source.short_error(err))
        except requests.RequestException as err:
            if settings.snapshot_fallback:
                log.warning("preflight: API %s unreachable (%s); the bundled snapshot will be used",
                            url, source.short_error(err))
            else:
                problems.append(f"API {url} unreachable ({source.short_error(err)}) and snapshot fallback is off")
    local = {"01_ingest", "02_clean", "03_load", "05_gold"} & set(stages)
    if local:
        s3 = storage.client(settings.store)
        try:
            storage.check(s3)
        except storage.StorageError as err:
            problems.append(f"object store {settings.store.url}: {err}")
    if {"03_load", "04_export"} & set(stages):
        try:
            db.connect(settings.db, attempts=2).close()
        except db.DatabaseError as err:
            problems.append(f"database: {err}")
    if {"04_export", "05_gold"} & set(stages):
        # A bucket on a real cloud must exist; an emulated one may be created by stage 4.
        cloud = storage.cloud_client(settings.cloud)
        try:
            storage.ensure_bucket(cloud, settings.cloud.bucket, create=settings.cloud.emulated)
        except Exception as err:  # noqa: BLE001
            problems.append(f"cloud bucket: {err}")
    return problems


# --- the run record ----------------------------------------------------------------------------------

@dataclass
class RunRecord:
    settings: config.Settings
    run_id: str
    data: dict = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return runs.run_dir(self.settings, self.run_id)

    @property
    def path(self) -> Path:
        return runs.manifest_path(self.settings, self.run_id)

    @classmethod
    def open(cls, settings, run_id: str, stages: list[str], params: dict[str, dict]) -> "RunRecord":
        record = cls(settings, run_id)
        existing = runs.read_json(record.path)
        if existing:
            record.data = existing
            record.data["status"] = "running"
            record.data.pop("preflight", None)
            record.data.setdefault("resumed", []).append(runs.now())
            record.data["requested_stages"] = sorted(set(record.data["requested_stages"]) | set(stages))
            for s in stages:  # a stage run again takes this invocation's parameters
                record.data["parameters"][s] = params.get(s, {})
        else:
            record.data = {
                "run_id": run_id,
                "status": "running",
                "started": runs.now(),
                "requested_stages": stages,
                "parameters": params,
                "stack": settings.describe(),
                "stages": {},
            }
        record.save()
        return record

    def save(self) -> None:
        runs.write_json(self.path, self.data)

    def stage_started(self, stage: str) -> None:
        entry = self.data["stages"].setdefault(stage, {"attempts": []})
        entry.update(status="running", started=runs.now(), ended=None, notebook=f"{stage}.ipynb")
        self.save()

    def stage_ended(self, stage: str, status: str, seconds: float, error: str | None = None) -> None:
        entry = self.data["stages"][stage]
        entry.update(status=status, ended=runs.now(), duration_s=round(seconds, 2))
        if error:
            entry["error"] = error
        else:
            entry.pop("error", None)
        stage_record = runs.read_stage(self.settings, self.run_id, stage) if status == "succeeded" else None
        if stage_record:
            entry.update(rows_in=stage_record["rows_in"], rows_out=stage_record["rows_out"],
                         objects=stage_record["artifacts"], details=stage_record["details"])
        self.save()

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
        self.data.update(status=status, ended=runs.now())
        self.data["lineage"] = [
            {"stage": s, "from": src, "to": obj.get("uri")}
            for s, entry in self.data["stages"].items()
            for obj in entry.get("objects", []) for src in obj.get("inputs", [])
        ]
        gold_details = self.data["stages"].get("05_gold", {}).get("details", {})
        if "reconciliation" in gold_details:
            self.data["reconciliation"] = gold_details["reconciliation"]
        self.save()

    def first_unfinished(self) -> int:
        stages = self.data["requested_stages"]
        for i, s in enumerate(stages):
            if self.data["stages"].get(s, {}).get("status") != "succeeded":
                return i
        return len(stages)


# --- executing notebooks ----------------------------------------------------------------------------

class Interrupted(Exception):
    pass


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def failed_cell(err: Exception) -> str:
    """'cell [7]: ValueError: ...' from a papermill error, or the error itself."""
    import papermill

    if isinstance(err, papermill.PapermillExecutionError):
        return f"cell [{err.exec_count}]: {err.ename}: {err.evalue}"
    return f"{type(err).__name__}: {err}"


def execute(record: RunRecord, stage: str, params: dict, *, kernel: str, start_timeout: int,
            cell_timeout: int) -> None:
    import papermill

    record.keep_attempt(stage)
    record.stage_started(stage)
    started = time.monotonic()
    output = record.dir / f"{stage}.ipynb"
    log.info("stage %s: running %s", stage, output)
    try:
        papermill.execute_notebook(
            str(NOTEBOOKS / f"{stage}.ipynb"), str(output),
            parameters={"run_id": record.run_id, **params},
            kernel_name=kernel, start_timeout=start_timeout, execution_timeout=cell_timeout,
            cwd=str(config.ROOT), progress_bar=False, log_output=False, request_save_on_cell_execute=True,
            # The kernel's own start-up warnings (loopback TCP transport) are noise in a run's output.
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )
    except Interrupted:
        record.stage_ended(stage, "interrupted", time.monotonic() - started, "interrupted")
        raise
    except BaseException as err:
        record.stage_ended(stage, "failed", time.monotonic() - started, failed_cell(err))
        raise
    record.stage_ended(stage, "succeeded", time.monotonic() - started)


def summary_line(stage: str, entry: dict) -> str:
    status = entry.get("status", "?")
    text = f"  {stage:<10} {status:<11} {entry.get('duration_s', 0):>6.1f}s"
    if status == "succeeded":
        text += f"  rows {entry.get('rows_in')} → {entry.get('rows_out')}"
        objects = entry.get("objects", [])
        if objects:
            text += f"  ({len(objects)} object{'s' if len(objects) != 1 else ''}: {objects[0].get('uri')}"
            text += " …)" if len(objects) > 1 else ")"
        details = entry.get("details", {})
        if details.get("origin") == "snapshot":
            text += "  [BUNDLED SNAPSHOT: API unreachable]"
        if details.get("quarantined"):
            text += f"  [{details['quarantined']} quarantined]"
    elif entry.get("error"):
        text += f"  {entry['error'][:200]}"
    return text


def ensure_stack(env: dict[str, str]) -> None:
    """Start the embedded services this configuration relies on (a running one is reused)."""
    needed = tuple(s for s, embedded in (("object_store", config.uses_embedded_store(env)),
                                         ("database", config.uses_embedded_db(env))) if embedded)
    if needed:
        stack.up(config.state_dir(env), needed)


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)

