"""Run records in the records bucket (lib/record_store.py), against the suite's real S3 server: stored
once per attempt and version, pulled into another machine's working copy as the runner reads it."""

from __future__ import annotations

import dataclasses
import json

import botocore.exceptions
import pytest

from lib import record_store, runs, storage


@pytest.fixture
def here(settings, tmp_path, unique):
    """A machine: its own outputs folder, the suite's store with a records bucket of this test's own."""
    return dataclasses.replace(settings, outputs_dir=tmp_path / "here", records_bucket=f"records-{unique}")


@pytest.fixture
def there(here, tmp_path):
    """Another machine: the same services, an outputs folder of its own."""
    return dataclasses.replace(here, outputs_dir=tmp_path / "there")


def stage_run(settings, run_id: str, stage: str, status: str = "succeeded", notebook: bytes = b"{}") -> None:
    """One execution of `stage`, as the runner leaves it: its record and its executed notebook."""
    record = runs.RunRecord(settings, run_id, runs.read_json(runs.manifest_path(settings, run_id)) or {})
    if not record.data:
        record = runs.RunRecord.open(settings, run_id, [stage], {stage: {}})
    record.stage_started(stage)
    (record.dir / f"{stage}.ipynb").write_bytes(notebook)
    if status != "running":
        record.stage_ended(stage, status, 0.1)


def stored_objects(s3, settings, run_id: str) -> dict[str, str]:
    """key → ETag of everything the store holds of a run."""
    found = s3.list_objects_v2(Bucket=settings.records_bucket, Prefix=f"runs/{run_id}/").get("Contents", [])
    return {o["Key"][len(f"runs/{run_id}/"):]: o["ETag"] for o in found}


def test_a_pushed_run_pulls_into_another_working_copy_as_it_was(here, there, s3, unique):
    run_id = f"stored-{unique}"
    stage_run(here, run_id, "01_ingest")
    stage_run(here, run_id, "02_clean")
    (runs.run_dir(here, run_id) / "report.html").write_text("<p>report</p>")
    assert record_store.push(here, run_id, strict=True)

    assert record_store.pull_all(there) == [run_id]
    mine, theirs = runs.run_dir(here, run_id), runs.run_dir(there, run_id)
    for name in ("manifest.json", "report.html", "stages/01_ingest.json", "stages/02_clean.json",
                 "01_ingest.ipynb", "02_clean.ipynb"):
        assert (theirs / name).read_bytes() == (mine / name).read_bytes(), name
    assert runs.RunRecord(there, run_id, runs.read_json(theirs / "manifest.json")).data["stages"].keys() == {
        "01_ingest", "02_clean"}
    assert record_store.pull_all(there) == []  # in step: nothing to bring


def test_objects_are_written_once_and_a_new_attempt_is_a_new_object(here, there, s3, unique):
    run_id = f"once-{unique}"
    stage_run(here, run_id, "02_clean", "failed", notebook=b'{"attempt": 1}')
    record_store.push(here, run_id, strict=True)
    first = stored_objects(s3, here, run_id)
    assert "stages/02_clean.attempt1.json" in first and "notebooks/02_clean.attempt1.ipynb" in first

    record_store.push(here, run_id, strict=True)
    assert stored_objects(s3, here, run_id) == first  # nothing changed here: nothing written

    stage_run(here, run_id, "02_clean", "succeeded", notebook=b'{"attempt": 2}')
    record_store.push(here, run_id, strict=True)
    second = stored_objects(s3, here, run_id)
    assert {k: v for k, v in second.items() if k in first} == first  # every earlier object untouched
    assert "stages/02_clean.attempt2.json" in second and "notebooks/02_clean.attempt2.ipynb" in second
    assert max(record_store.Stored(second).versions) > max(record_store.Stored(first).versions)

    # The store itself refuses a rewrite.
    with pytest.raises(botocore.exceptions.ClientError, match="PreconditionFailed"):
        s3.put_object(Bucket=here.records_bucket, Key=f"runs/{run_id}/stages/02_clean.attempt1.json", Body=b"{}",
                      IfNoneMatch="*")

    # Pulled elsewhere, the latest attempt is the stage's record, the earlier one kept aside.
    record_store.pull(there, run_id)
    assert runs.read_stage(there, run_id, "02_clean")["status"] == "succeeded"
    assert (runs.run_dir(there, run_id) / "02_clean.ipynb").read_bytes() == b'{"attempt": 2}'
    (earlier,) = runs.attempt_paths(there, run_id, "02_clean")
    assert runs.read_json(earlier)["status"] == "failed"
    assert runs.read_json(earlier)["notebook"] == "02_clean.attempt1.ipynb"
    assert (runs.run_dir(there, run_id) / "02_clean.attempt1.ipynb").read_bytes() == b'{"attempt": 1}'
    derived = runs.derive_stages(there, run_id)["02_clean"]
    assert derived["status"] == "succeeded" and [a["status"] for a in derived["attempts"]] == ["failed"]


def test_a_stage_still_running_is_not_stored(here, s3, unique):
    run_id = f"running-{unique}"
    stage_run(here, run_id, "01_ingest")
    stage_run(here, run_id, "02_clean", "running")
    record_store.push(here, run_id, strict=True)
    keys = stored_objects(s3, here, run_id)
    assert "stages/01_ingest.attempt1.json" in keys
    assert not any("02_clean" in key for key in keys), keys


def test_another_machines_later_attempt_replaces_the_current_one_here(here, there, unique):
    """Stage 2 ran here, then again there: pulled here, there's attempt is current, this one aside."""
    run_id = f"later-{unique}"
    stage_run(here, run_id, "02_clean", "failed")
    record_store.push(here, run_id, strict=True)
    record_store.pull(there, run_id)
    stage_run(there, run_id, "02_clean", "succeeded", notebook=b'{"there": 2}')
    record_store.push(there, run_id, strict=True)

    record_store.pull(here, run_id)
    assert runs.read_stage(here, run_id, "02_clean")["status"] == "succeeded"
    assert (runs.run_dir(here, run_id) / "02_clean.ipynb").read_bytes() == b'{"there": 2}'
    assert [runs.read_json(p)["status"] for p in runs.attempt_paths(here, run_id, "02_clean")] == ["failed"]
    assert runs.read_json(runs.manifest_path(here, run_id))["stages"]["02_clean"]["status"] == "succeeded"


def test_a_newer_attempt_here_is_kept_when_the_store_is_behind(here, there, unique):
    run_id = f"ahead-{unique}"
    stage_run(here, run_id, "02_clean", "failed")
    record_store.push(here, run_id, strict=True)
    stage_run(here, run_id, "02_clean", "running")  # attempt 2, going on here now

    record_store.pull(here, run_id)
    assert runs.read_stage(here, run_id, "02_clean")["status"] == "running"
    assert [runs.read_json(p)["status"] for p in runs.attempt_paths(here, run_id, "02_clean")] == ["failed"]


def test_a_changed_copy_of_a_stored_record_is_put_back_as_stored(here, unique):
    """The store is the record; outputs/ only a copy: a stage record edited here is pulled back."""
    run_id = f"edited-{unique}"
    stage_run(here, run_id, "02_clean")
    record_store.push(here, run_id, strict=True)
    path = runs.stage_path(here, run_id, "02_clean")
    stored = path.read_bytes()
    record = json.loads(stored)
    record["details"]["forged"] = True
    path.write_text(json.dumps(record))

    record_store.pull(here, run_id)
    assert path.read_bytes() == stored


def test_a_store_that_cannot_be_reached_is_said_and_nothing_is_lost(here, unique):
    run_id = f"away-{unique}"
    stage_run(here, run_id, "01_ingest")
    away = dataclasses.replace(here, store=dataclasses.replace(here.store, url="http://127.0.0.1:9"))
    assert record_store.push(away, run_id) is False
    with pytest.raises(record_store.RecordStoreError, match=f"run {run_id}.*s3://{here.records_bucket}/runs/{run_id}/"):
        record_store.push(away, run_id, strict=True)
    assert runs.read_stage(here, run_id, "01_ingest")["status"] == "succeeded"
    assert record_store.push(here, run_id, strict=True)  # once the store is back


def test_sync_stores_what_only_this_copy_holds(here, there, s3, unique):
    run_id = f"local-{unique}"
    stage_run(here, run_id, "01_ingest")  # recorded while nothing was pushed
    record_store.sync_all(here)
    assert "stages/01_ingest.attempt1.json" in stored_objects(s3, here, run_id)
    record_store.sync_all(there)
    assert runs.read_stage(there, run_id, "01_ingest")["status"] == "succeeded"


def test_a_version_is_taken_only_once_its_files_are_all_stored(here, there, s3, unique):
    run_id = f"partial-{unique}"
    stage_run(here, run_id, "01_ingest")
    (runs.run_dir(here, run_id) / "report.html").write_text("v1")
    record_store.push(here, run_id, strict=True)
    record_store.pull(there, run_id)
    # A writer that stopped after its version's manifest: the version names a page it never wrote.
    latest = record_store.Stored(stored_objects(s3, here, run_id)).latest
    storage.put_bytes(s3, here.records_bucket, f"runs/{run_id}/versions/{latest + 1:06d}/manifest.json", b"{}",
                      metadata={record_store.FILES_META: "report.html"}, content_type="application/json")
    record_store.pull(there, run_id)
    assert (runs.run_dir(there, run_id) / "report.html").read_text() == "v1"
    assert runs.read_json(runs.manifest_path(there, run_id)) != {}


def test_a_copy_in_step_with_one_bucket_is_stored_in_another_when_records_bucket_changes(here, s3, unique):
    run_id = f"moved-{unique}"
    stage_run(here, run_id, "01_ingest")
    record_store.push(here, run_id, strict=True)
    moved = dataclasses.replace(here, records_bucket=f"records-moved-{unique}")
    record_store.sync_all(moved)
    keys = stored_objects(s3, moved, run_id)
    assert "stages/01_ingest.attempt1.json" in keys and any(k.endswith("/manifest.json") for k in keys), keys


def test_pushes_queued_while_a_run_goes_on_are_stored_before_the_next_push(here, there, s3, unique):
    """The runner stores each ended stage in the background (`push_soon`): in order, one at a time,
    and a `push` (the publish's, the run's end) first waits for them, so what it stores is whole."""
    run_id = f"soon-{unique}"
    for stage in ("01_ingest", "02_clean", "03_load"):
        stage_run(here, run_id, stage)
        record_store.push_soon(here, run_id)
    assert record_store.push(here, run_id, strict=True)
    assert not record_store._queued
    stored = stored_objects(s3, here, run_id)
    assert {f"stages/{s}.attempt1.json" for s in ("01_ingest", "02_clean", "03_load")} <= set(stored)
    assert record_store.pull_all(there) == [run_id]
    assert (runs.run_dir(there, run_id) / "stages/03_load.json").read_bytes() == \
        (runs.run_dir(here, run_id) / "stages/03_load.json").read_bytes()
