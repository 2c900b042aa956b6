"""Stage 1 called directly on the real services: run ids give the ingest date, bronze is written once a run."""

from __future__ import annotations

from lib import layout
from lib.stages import context, ingest


def test_ingest_date_comes_from_a_generated_run_id():
    assert layout.ingest_date("20310715T101500Z-abc123") == "2031-07-15"
    assert len(layout.ingest_date("nightly-42")) == 10  # today, for a run id without a date


def test_running_ingest_again_for_a_run_reuses_its_bronze(settings, s3, api, unique):
    run_id = f"st-reuse-{unique}"
    first = ingest.run(context.begin("01_ingest", run_id, min_records=200))
    again = ingest.run(context.begin("01_ingest", run_id, min_records=200))
    assert not first.reused and again.reused
    assert again.artifact.sha256 == first.artifact.sha256 and again.artifact.key == first.artifact.key
    assert len(api.requests) == 1  # the API was asked once
    assert len(context.run_objects(s3, settings.raw_bucket, run_id)) == 1
