"""One run's data, layer by layer, for the exploration notebook (`notebooks/explore.ipynb`, not a
stage): the raw payload, silver, the quarantine, the table as of the run, the export and gold.

Each object is read where the run's record says it was written, with the pipeline's own clients
(settings from the environment or `.env`: no credential passes through the notebook). "The table as
of a run" is the table right after that run's publish, read from the history (`db_read.as_of`: the
rows valid at the run's latest load of the table); a run that was never published shows its staging
copy while it exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lib import config, db, db_read, db_schema, formats, layout, names, record_store, registry, runs, storage
from lib.errors import PipelineError
from lib.registry import Layer
from lib.stages import parameters
from lib.publish import latest_published

NOTEBOOK = registry.NOTEBOOKS / "explore.ipynb"  # the notebook that calls this module
# The layers a run's data can be opened at, in the order the data goes.
LAYERS = tuple(layer for layer in Layer if layer is not Layer.API)


class ExploreError(PipelineError):
    """A run or a layer that cannot be shown; the message says what was looked for."""


@dataclass
class RunData:
    settings: config.Settings
    run_id: str
    manifest: dict

    @property
    def table(self) -> str:
        loaded = self.manifest.get("parameters", {}).get(registry.writer_of(Layer.TABLE).name) or {}
        return loaded.get("table") or parameters.DEFAULT_TABLE

    def __repr__(self) -> str:
        stack = self.manifest.get("stack", {})
        where = ", ".join(f"{k} {v.get('kind')}" for k, v in stack.items() if isinstance(v, dict))
        return (f"run {self.run_id}: {self.manifest.get('status')}, started {self.manifest.get('started')}, "
                f"stages {', '.join(self.manifest.get('requested_stages', []))} ({where})")


def open_run(settings: config.Settings, run_id: str = "") -> RunData:
    """A run's record; `run_id` empty: the latest published run of the default table."""
    if not run_id:
        run_id = latest_published(settings, parameters.DEFAULT_TABLE) or ""
        if not run_id:
            raise ExploreError(f"no run of table {parameters.DEFAULT_TABLE} has been published yet: run the "
                               "pipeline first (make run), or set run_id")
    record_store.pull(settings, names.run_id(run_id))  # recorded here or by another worker
    manifest = runs.read_json(runs.manifest_path(settings, run_id))
    if manifest is None:
        raise ExploreError(f"no run {run_id} in {runs.runs_dir(settings)}")
    return RunData(settings, run_id, manifest)


_PICK = {
    Layer.RAW: lambda o: True,
    Layer.CLEAN: lambda o: layout.is_clean(o.get("key", "")),
    Layer.QUARANTINE: lambda o: layout.is_quarantine(o.get("key", "")),
    Layer.TABLE: lambda o: o.get("role") == "database",
    Layer.CLOUD: lambda o: o.get("role") == "cloud",
    Layer.GOLD: lambda o: layout.is_gold_table(o.get("key", "")),
}


def objects(run: RunData, layer: Layer | str) -> list[dict]:
    """The objects of `layer` the run's record lists (written by the stage that writes the layer)."""
    layer = Layer(layer)
    entry = run.manifest.get("stages", {}).get(registry.writer_of(layer).name) or {}
    return [o for o in entry.get("objects", []) if _PICK[layer](o)]


def _bytes(run: RunData, obj: dict) -> bytes:
    client = (storage.cloud_client(run.settings.cloud) if obj.get("role") == "cloud"
              else storage.client(run.settings.store))
    return storage.get_bytes(client, obj["bucket"], obj["key"])[0]


def read(run: RunData, layer: Layer | str):
    """The run's rows at `layer`, as a DataFrame: the raw payload's records as the API sent them, the
    other objects as they are stored, the table as of the run."""
    import pandas as pd

    layer = Layer(layer)
    if layer is Layer.TABLE:
        return table_as_of(run)
    found = objects(run, layer)
    if not found:
        writer = registry.writer_of(layer).name
        if (run.manifest.get("stages", {}).get(writer) or {}).get("status") == "succeeded":
            return pd.DataFrame()  # the stage ran and had nothing for this layer (no record quarantined)
        raise ExploreError(f"run {run.run_id} has no {layer.label} object: {writer} did not succeed in it")
    if layer is Layer.RAW:
        return pd.DataFrame([record for obj in found for record in json.loads(_bytes(run, obj))])
    return pd.concat([formats.of_key(obj["key"]).read(_bytes(run, obj)) for obj in found], ignore_index=True)


def table_as_of(run: RunData):
    """The table right after the run's publish (from the history), or its staging copy when the run
    was never published and the copy is still there."""
    schema, table = "public", run.table
    loaded = (run.manifest.get("stages", {}).get(registry.writer_of(Layer.TABLE).name) or {}).get("details") or {}
    schema = loaded.get("schema") or schema
    conn = db.connect(run.settings.db, application_name=f"countries-medallion explore {run.run_id}")
    try:
        with conn.cursor() as cur:
            published = db_schema.loaded_since(cur, schema, table, run.run_id, None)
        if published:
            return db_read.as_of(conn, schema, table, run.run_id)
        staged = loaded.get("staged_schema")
        if staged and db.table_exists(conn, staged, table):
            return db_read.current(conn, staged, table)
        raise ExploreError(f"run {run.run_id} never published {schema}.{table}, and its staging copy is gone")
    finally:
        conn.close()
