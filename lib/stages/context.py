"""The shared context of a stage: what every stage notebook starts with and every stage module uses.

A notebook is: parameters → `begin()` → one or two calls into its stage module (lib/stages/<name>.py)
→ previews → `finish()`. `begin` checks the parameters, loads the settings (from the environment,
never from parameters), picks the run and opens the stage record; the stage modules write objects
with metadata and fill that record. Inputs are proven before use (`verify_input`, `spooled_input`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from lib import (config, contract, db, formats, layout, lineage, memory, names, pages, publish, quality, record_store,
                 registry, report, runs, storage)
from lib import log as logsetup
from lib.errors import PipelineError
from lib.stages import parameters

log = logging.getLogger(__name__)


SAMPLE_RECORDS = 1000  # records kept for previews (a payload or table is never held whole)


class StageError(PipelineError):
    """A stage cannot go on; the message says what was wrong and what was (not) written."""


@dataclass
class StageRun:
    name: str
    run_id: str
    settings: config.Settings
    record: runs.StageRecord
    params: Any  # the stage's typed parameters (lib/stages/parameters.py `values`)

    def finish(self) -> str:
        """Save the record; returns its path, which a notebook displays as what was recorded. A run
        outside the runner gets the rest of its record here, at the notebook's last cell (`ended`)."""
        path = self.record.save()
        log.info("%s of run %s done; record %s", self.name, self.run_id, path)
        self.ended()
        return RecordView(path, self.record.data)

    @property
    def interactive(self) -> bool:
        return self.record.data["origin"] != "runner"

    def refresh_manifest(self, **update) -> runs.RunRecord | None:
        """An interactive run's manifest, derived again from its stage records (the runner does
        this itself for its runs)."""
        if not self.interactive:
            return None
        record = runs.RunRecord(self.settings, self.run_id)
        record.data = runs.read_json(record.path) or {}
        record.data.update(update)
        record.refresh()
        return record

    def ended(self) -> None:
        """The end of a stage run outside the runner (its last cell, or a cell that failed): what the
        runner does for its runs, done here: the manifest with its end, the stage's OpenLineage end
        event, the run's report and the index, all of it stored in the records bucket. The runner's
        runs get all of it from the runner."""
        record = self.refresh_manifest(ended=runs.now())
        if record is None:
            return
        lineage.stage_ended(record, self.name)  # in the background, bounded (lib/outbox.py)
        try:
            report.write(record.dir)
            report.write_index(self.settings.outputs_dir)
        except Exception as err:  # noqa: BLE001 - `run_pipeline.py report RUN_ID` renders them again
            log.warning("the pages of run %s were not written: %s", self.run_id, err)
        record_store.push(self.settings, self.run_id)  # never raises: the next push or `runs` stores it

    def meta(self, **extra) -> dict:
        """The metadata every object of this stage carries."""
        return {"run-id": self.run_id, "stage": self.name, **extra}

    def db_connection(self):
        return db.connect(self.settings.db, application_name=f"countries-medallion {self.name} {self.run_id}")

    @property
    def based_on(self) -> str | None:
        """The run an interactive run reads from when it did not run the earlier stages itself."""
        return runs.based_on(self.settings, self.run_id)

    def source_run(self, stage_name: str) -> str:
        """The run whose execution of `stage_name` this stage builds on: this run when it executed
        that stage, else the run it is based on (lib/runs.py `resolve_run_id`)."""
        if runs.read_stage(self.settings, self.run_id, stage_name) is None:
            base = self.based_on
            if base and runs.read_stage(self.settings, base, stage_name) is not None:
                return base
        return self.run_id

    def input_run(self, layer: str) -> str:
        """The run whose `layer` objects this stage reads."""
        return self.source_run(registry.writer_of(layer).name)

    def previous_record(self, layer: str) -> dict | None:
        """The record of the stage that wrote `layer` (in this run, or the run it is based on)."""
        writer = registry.writer_of(layer).name
        return runs.read_stage(self.settings, self.source_run(writer), writer)


def begin(stage: str, given: str | Mapping | None = None, /, **overrides) -> StageRun:
    """Start a stage: its typed parameters (lib/stages/parameters.py), the settings (from the
    environment, never from parameters), logging, the run and its stage record. A notebook passes
    its namespace (`begin(<stage>, globals())`: the declared names are read from it); code passes
    a run id and the parameters it sets (`begin(<stage>, run_id, min_records=5)`), the rest being
    their defaults."""
    registry.get(stage)
    memory.tune()  # a kernel the runner did not start (JupyterLab's, papermill's) gets the same heap
    if isinstance(given, Mapping):
        chosen = {name: given[name] for name in parameters.declared(stage) if name in given}
    else:
        chosen = {"run_id": given} if given else {}
    chosen.update(overrides)
    params = parameters.values(stage, chosen)
    run_id = params.run_id
    settings = config.settings()
    # In a notebook only what went wrong is shown, briefly (stderr would show every line as an alarm);
    # the daily log file keeps every line with its time.
    logsetup.setup(settings.logs_dir, settings.secrets(), stream=sys.stdout, stream_level=logging.WARNING,
                   stream_format="%(levelname)s: %(message)s")
    if run_id and runs.origin() != "runner":  # a run named here may have been recorded on another machine
        record_store.pull(settings, names.run_id(run_id))
    rid = runs.resolve_run_id(settings, run_id, stage)
    used = {k: v for k, v in dataclasses.asdict(params).items() if k != "run_id"}
    if runs.origin() != "runner":
        given = getattr(params, "input_run", "")
        needed = runs.needs_base(settings, rid, stage) and parameters.reads_a_run(stage, used)
        base = given or (_latest_published(settings, stage, params) if needed else None)
        if base:  # the run whose data and records this one reads, wherever it was recorded
            record_store.pull(settings, names.run_id(base))
        runs.open_interactive(settings, rid, stage, base, used)
    record = runs.StageRecord(settings, rid, stage, used).start()
    log.info("%s of run %s starting (%s)", stage, rid, record.data["origin"])
    current = StageRun(stage, rid, settings, record, params)
    if current.interactive:
        if current.based_on:
            log.info("run %s reads the data of run %s and writes only into its own record", rid, current.based_on)
        _watch_cells(current)
        lineage.stage_started(current.refresh_manifest(), stage)  # the runner sends it for its runs
    return current


def _latest_published(settings: config.Settings, stage: str, params) -> str:
    """The run a new run that starts at `stage` reads from: the latest published run of its table."""
    table = getattr(params, "table", parameters.DEFAULT_TABLE)
    found = publish.latest_published(settings, table)
    if found is None:
        raise StageError(f"{stage} reads the data of the latest published run, and table {table} has none yet: "
                         "run every stage first (make run), or set input_run to the run whose data to read")
    return found


_WATCHER = None  # the post_run_cell hook of the stage begun last in this kernel


def _watch_cells(stage: StageRun) -> None:
    """Outside the runner nobody else sees a cell fail: in an IPython kernel, a failing cell marks
    the stage record failed (and the manifest follows)."""
    global _WATCHER
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    if _WATCHER is not None:
        try:
            shell.events.unregister("post_run_cell", _WATCHER)
        except ValueError:
            pass

    def watcher(result):
        error = result.error_in_exec or result.error_before_exec
        if error is not None and stage.record.data.get("status") == "running":
            stage.record.fail(f"{type(error).__name__}: {error}")
            stage.ended()

    shell.events.register("post_run_cell", watcher)
    _WATCHER = watcher


def run_objects(s3, bucket: str, run_id: str | None = None, date: str | None = None) -> list[dict]:
    """Objects of the dataset for one run (any date) or one date (any run), oldest first."""
    found = storage.list_objects(s3, bucket, layout.dataset_prefix(date))
    if run_id:
        found = [o for o in found if layout.run_of(o["key"]) == run_id]
    return sorted(found, key=lambda o: (o["last_modified"], o["key"]))


def database_uri(settings: config.Settings, schema: str, table: str) -> str:
    return f"postgresql://{settings.db.host}:{settings.db.port}/{settings.db.name}/{schema}.{table}"


def verify_input(stage: StageRun, s3, bucket: str, key: str, layer: str, *, required: bool = True,
                 against_record: bool = True) -> tuple[bytes, dict]:
    """Read an input object and prove it is what the stage that wrote it recorded: its sha256 must
    match the object's own metadata and the writer's stage record (when `required`, that record
    must exist; `against_record=False` checks the metadata only, for another run's objects). Raises
    StageError naming the object and the disagreeing side before anything is written."""
    data, meta = storage.get_bytes(s3, bucket, key)
    uri = f"s3://{bucket}/{key}"
    expected = expected_sha256(stage, uri, layer, meta, required=required, against_record=against_record)
    prove(stage, uri, storage.sha256(data), expected)
    return data, meta


def expected_sha256(stage: StageRun, uri: str, layer: str, meta: dict, *, required: bool = True,
                    against_record: bool = True) -> dict[str, str | None]:
    """What each witness says an input object's sha256 is: its own metadata and, unless
    `against_record` is off, the record of the stage that wrote `layer` (which must exist when
    `required`). One place for the proof `verify_input` and the streamed readers make."""
    expected = {"the object's metadata": meta.get("sha256")}
    record = stage.previous_record(layer) if against_record else None
    if record is not None:
        listed = [a.get("sha256") for a in record.get("artifacts", []) if a.get("uri") == uri]
        expected[f"the {record['stage']} record of run {record['run_id']}"] = listed[-1] if listed else "nothing (not listed)"
    elif required and against_record:
        writer = registry.writer_of(layer).name
        raise StageError(f"{uri}: no {writer} record to check it against in run {stage.input_run(layer)}; "
                         f"run {writer} first; nothing was written")
    return expected


def prove(stage: StageRun, uri: str, digest: str, expected: dict[str, str | None]) -> None:
    """Raise StageError naming the first witness whose sha256 is not the one read."""
    for where, value in expected.items():
        if value != digest:
            raise StageError(f"checksum mismatch for {uri}: sha256 {digest} but {where} says {value}; "
                             f"nothing was written by {stage.name}")


@contextlib.contextmanager
def young_gc_only():
    """Parsing and flattening make millions of small containers that live for one chunk: the
    cyclic collector, left to itself, goes through every one of them again and again (it tripled
    the time of a chunk). It is paused meanwhile: parsed JSON holds no cycles, and what is freed
    is freed by reference counting as each chunk goes."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def spooled_input(stage: StageRun, s3, bucket: str, key: str, layer: str, read=None):
    """`verify_input` for an object too large to hold: streamed to a spool on disk while hashed, then
    its sha256 proven against its metadata and the writer's record (when there is one), before
    anything is written. `read`, when given, reads the object as it downloads (a file object read
    forward only, lib/formats.py ForwardReader) and its result is returned with the spool; what it
    raises is raised after the proof, so a changed object is reported as changed. Close the spool
    after use."""
    body, meta = storage.open_object(s3, bucket, key)
    spool = storage.HashingSpool()
    result, failure = None, None
    try:
        stream = formats.ForwardReader(body, sink=spool)
        if read is not None:
            try:
                result = read(stream)
            except Exception as err:  # noqa: BLE001 - raised below, once the bytes are proven
                failure = err
        while stream.read(8 << 20):
            pass
    except BaseException:
        spool.close()
        raise
    finally:
        body.close()
    uri = f"s3://{bucket}/{key}"
    try:
        prove(stage, uri, spool.sha256, expected_sha256(stage, uri, layer, meta, required=False))
        if failure is not None:
            raise failure
    except BaseException:
        spool.close()
        raise
    return spool, result



# --- previews ---------------------------------------------------------------------------------------

def preview(frame: pd.DataFrame, rows: int = 10, by: str | None = contract.KEY) -> pd.DataFrame:
    """A small, sorted preview with long free text cut short, so run records stay light; URIs and
    keys are shown whole."""
    out = frame.sort_values(by).head(rows) if by and by in frame else frame.head(rows)
    return out.map(lambda v: quality.safe_text((v[:60] + "…") if isinstance(v, str) and len(v) > 61
                                                and "://" not in v else v))


def schema(frame: pd.DataFrame) -> pd.DataFrame:
    """Column, dtype, non-null count and an example value."""
    return pd.DataFrame({
        "column": frame.columns,
        "dtype": [str(t) for t in frame.dtypes],
        "non_null": [int(frame[c].notna().sum()) for c in frame.columns],
        "example": [quality.safe_text(str(frame[c].dropna().iloc[0])[:40]) if frame[c].notna().any() else ""
                    for c in frame.columns],
    })


# --- what a notebook's last cell shows ---------------------------------------------------------------

class RecordView(str):
    """The path of a saved stage record (a str) that displays as what was recorded: counts,
    objects with full URIs, details, and request attempts when there were retries."""

    def __new__(cls, path, data: dict):
        view = super().__new__(cls, str(path))
        view.data = data
        return view

    def _details(self) -> tuple[list[dict], list[tuple[str, list[dict]]]]:
        plain, tables = [], []
        for key, value in self.data.get("details", {}).items():
            if key == "attempts" and len(value or []) <= 1:
                continue  # a single successful request says nothing
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                tables.append((key, value))
            else:
                plain.append({"detail": key, "value": value})
        return plain, tables

    def _repr_html_(self) -> str:
        d = self.data
        plain, tables = self._details()
        return pages.render(
            "record.html", stage=d.get("stage", ""), run_id=d.get("run_id", ""), rows_in=d.get("rows_in"),
            rows_out=d.get("rows_out"), objects=d.get("artifacts", []), path=str(self), plain=plain,
            tables=[(key, rows, list(dict.fromkeys(k for r in rows for k in r))) for key, rows in tables])

    def __repr__(self) -> str:
        d = self.data
        lines = [f"recorded {d.get('stage')} of run {d.get('run_id')}: rows {d.get('rows_in')} → {d.get('rows_out')}",
                 f"record: {str(self)}"]
        lines += [f"  object {o.get('uri')}  size {o.get('size')}  rows {o.get('rows')}  sha256 {o.get('sha256')}"
                  for o in d.get("artifacts", [])]
        plain, tables = self._details()
        for key, rows in tables:
            lines.append(f"  {key}:")
            lines += [f"    {json.dumps(r, ensure_ascii=False, default=str)}" for r in rows]
        lines += [f"  {p['detail']}: {json.dumps(p['value'], ensure_ascii=False, default=str)}" for p in plain]
        return "\n".join(lines)
