"""Stages run in this process the way the notebooks call them (no papermill), for the stage tests."""

from __future__ import annotations

from lib import publish, storage
from lib.stages import clean, context, export, gold, ingest, load


def run_stages(run_id: str, table: str, upto: int = 5, gold_format: str = "", options: dict | None = None,
               publish_run: bool = True) -> dict:
    """Run stages 1..upto of one run the way the notebooks do; returns what each returned.
    `options`: more parameters by stage; `publish_run`: publish it after stage 5, as the runner does."""
    out, options = {}, options or {}
    stage = context.begin("01_ingest", run_id, min_records=200, **options.get("01_ingest", {}))
    out["ingest"] = ingest.run(stage)
    stage.finish()
    stage = context.begin("02_clean", run_id, min_records=200)
    clean.write(stage, clean.prepare(stage))
    stage.finish()
    stage = context.begin("03_load", run_id, table=table)
    out["load"] = load.run(stage)
    stage.finish()
    stage = context.begin("04_export", run_id, table=table, **options.get("04_export", {}))
    out["export"] = export.run(stage)
    stage.finish()
    if upto >= 5:
        stage = context.begin("05_gold", run_id, table=table, gold_format=gold_format)
        out["gold"] = gold.build(stage)
        gold.reconcile(stage, out["gold"])
        stage.finish()
        if publish_run:
            publish.run(stage.settings, run_id)  # as the runner does once the run is proven
    return out


def gold_keys(s3, settings, run_id: str) -> list[str]:
    storage.ensure_bucket(s3, settings.gold_bucket)  # a test run alone may not have made it yet
    return [o["key"] for o in storage.list_objects(s3, settings.gold_bucket) if f"/run_id={run_id}/" in o["key"]]
