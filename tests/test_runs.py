"""lib.runs: run ids, run folders, atomic JSON and the stage records stages leave behind."""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime, timezone

import pytest

from lib import config, hints, names, registry, runs, storage
from lib.errors import PipelineError
from lib.names import InvalidName
from lib.runs import RunRecord

ALL = list(registry.NAMES)


@pytest.fixture
def settings(tmp_path):
    """Settings whose outputs live in tmp_path; no service is contacted by lib.runs."""
    return config.settings({"MINIO_URL": "http://s3.invalid", "MINIO_ACCESS_KEY": "a", "MINIO_SECRET_KEY": "b",
                        "DB_HOST": "db.invalid", "DB_USER": "u", "DB_NAME": "n",
                        "PIPELINE_STATE_DIR": str(tmp_path / "state"),
                        "PIPELINE_OUTPUTS_DIR": str(tmp_path / "outputs")})


def test_new_run_ids_are_timestamped_unique_and_valid():
    when = datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
    ids = {runs.new_run_id(when) for _ in range(20)}
    assert len(ids) == 20
    for rid in ids:
        assert re.fullmatch(r"20250304T050607Z-[0-9a-f]{6}", rid)
        assert names.run_id(rid) == rid


def test_run_dir_is_under_outputs_runs_and_refuses_unsafe_ids(settings):
    assert runs.run_dir(settings, "r1") == settings.outputs_dir / "runs" / "r1"
    for bad in ("../escape", "a/b", ""):
        with pytest.raises(InvalidName):
            runs.run_dir(settings, bad)


def test_write_json_replaces_atomically_and_read_json_of_a_missing_file_is_none(tmp_path):
    path = tmp_path / "deep" / "x.json"
    assert runs.read_json(path) is None
    runs.write_json(path, {"a": 1, "when": datetime(2025, 1, 1)})
    runs.write_json(path, {"a": 2, "text": "Åland"})
    assert runs.read_json(path) == {"a": 2, "text": "Åland"}
    assert "Åland" in path.read_text(encoding="utf-8")
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temporary file left


def test_stage_path_refuses_unknown_stages(settings):
    assert runs.stage_path(settings, "r1", "03_load").name == "03_load.json"
    with pytest.raises(ValueError, match="unknown stage"):
        runs.stage_path(settings, "r1", "06_extra")


def test_latest_run_id_is_none_without_runs_and_then_the_most_recent(settings):
    assert runs.latest_run_id(settings) is None
    for rid in ("b-older", "a-newer"):
        runs.StageRecord(settings, rid, "01_ingest").save()
        stamp = time.time() - (100 if rid == "b-older" else 0)
        os.utime(runs.run_dir(settings, rid) / "stages", (stamp, stamp))
    (runs.runs_dir(settings) / "..bad").mkdir()
    assert runs.latest_run_id(settings) == "a-newer"


def test_resolve_run_id_outside_the_runner(settings, monkeypatch):
    monkeypatch.delenv(runs.RUNNER_ENV, raising=False)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    monkeypatch.setattr(runs, "_KERNEL_RUN", [])
    assert runs.resolve_run_id(settings, "given-1", "01_ingest") == "given-1"  # a new named run
    assert runs.resolve_run_id(settings, "given-2", "03_load") == "given-2"  # reads another run's data
    with pytest.raises(InvalidName):
        runs.resolve_run_id(settings, "bad/id", "03_load")
    # Empty: this kernel session's own run, whatever the stage, and the same for every stage it runs.
    new = runs.resolve_run_id(settings, "", "02_clean")
    assert re.fullmatch(r"papermill-\d{8}T\d{6}Z-[0-9a-f]{6}", new)
    assert runs.resolve_run_id(settings, "", "03_load") == runs.resolve_run_id(settings, "", "01_ingest") == new
    monkeypatch.setattr(runs, "_KERNEL_RUN", [])  # another kernel
    monkeypatch.setenv("JPY_SESSION_NAME", "notebooks/02_clean.ipynb")
    own = runs.resolve_run_id(settings, "", "02_clean")
    assert own.startswith("lab-") and own != new

    # A new run that starts after stage 1 is told which run it reads (context.begin: the latest published).
    assert runs.needs_base(settings, own, "02_clean") and not runs.needs_base(settings, own, "01_ingest")
    runs.open_interactive(settings, own, "02_clean", "r-runner", {"min_records": 5})
    assert not runs.needs_base(settings, own, "03_load")
    runs.open_interactive(settings, own, "03_load")
    saved = runs.read_json(runs.manifest_path(settings, own))
    assert saved["origin"] == "jupyterlab" and saved["based_on"] == "r-runner"
    assert saved["requested_stages"] == ["02_clean", "03_load"]
    assert saved["parameters"]["02_clean"] == {"min_records": 5}
    assert runs.based_on(settings, own) == "r-runner"
    with pytest.raises(PipelineError, match="reads the data of run r-runner, not other"):
        runs.open_interactive(settings, own, "04_export", "other")
    # Naming the runner's run is refused, with how to re-run a stage properly.
    RunRecord.open(settings, "r-runner", ALL, {})
    with pytest.raises(runs.RecordClosed, match=re.escape(hints.command("--stages", "3", "--run-id", "r-runner"))):
        runs.resolve_run_id(settings, "r-runner", "03_load")
    assert runs.resolve_run_id(settings, own, "03_load") == own


def test_run_again_gives_the_stages_the_parameters_the_run_gave_them(settings):
    RunRecord.open(settings, "r-again", ALL, {"03_load": {"table": "t one", "retire_missing": False},
                                             "04_export": {"table": "t one", "column_case": "upper"}})
    assert runs.run_again(settings, "r-again", ["03_load", "04_export", "05_gold"]) == hints.command(
        "--stages", "3-5", "--run-id", "r-again", "-p", "table=t one", "-p", "retire_missing=false",
        "-p", "column_case=upper")
    assert runs.run_again(settings, "r-again", ["02_clean"]) == hints.command("--stages", "2", "--run-id", "r-again")


def test_resolve_run_id_under_the_runner(settings, monkeypatch):
    monkeypatch.setenv(runs.RUNNER_ENV, "r-9")
    assert runs.resolve_run_id(settings, "", "03_load") == "r-9"
    assert runs.resolve_run_id(settings, "r-9", "03_load") == "r-9"
    with pytest.raises(PipelineError, match="differs from the runner's run"):
        runs.resolve_run_id(settings, "other", "03_load")
    assert runs.origin() == "runner"


def test_stage_record_saves_counts_artifacts_and_details(settings):
    record = runs.StageRecord(settings, "r1", "02_clean", {"min_records": 5})
    record.output(storage.Artifact("clean", "k/x.csv", 10, "d" * 64, rows=3, inputs=["s3://raw/k"]))
    record.output({"uri": "postgresql://h/db/public.t", "rows": 3})
    record.update(rows_in=4, rows_out=3.0, quarantined=1)
    record.update(drift={})
    path = record.save()
    saved = runs.read_stage(settings, "r1", "02_clean")
    assert path == runs.stage_path(settings, "r1", "02_clean")
    assert saved["stage"] == "02_clean" and saved["run_id"] == "r1"
    assert saved["parameters"] == {"min_records": 5}
    assert (saved["rows_in"], saved["rows_out"]) == (4, 3)
    assert saved["details"] == {"quarantined": 1, "drift": {}}
    assert saved["artifacts"][0]["uri"] == "s3://clean/k/x.csv" and saved["artifacts"][0]["inputs"] == ["s3://raw/k"]
    assert saved["artifacts"][1]["rows"] == 3
    assert saved["started"] <= saved["finished"]


def test_read_stage_of_a_stage_that_did_not_run_is_none(settings):
    assert runs.read_stage(settings, "r1", "05_gold") is None


# --- the run record ------------------------------------------------------------------------------------

@pytest.fixture
def offline(tmp_path):
    return config.settings({"MINIO_URL": "http://s3.invalid", "MINIO_ACCESS_KEY": "access-value",
                        "MINIO_SECRET_KEY": "secret-value", "DB_HOST": "db.invalid", "DB_USER": "u",
                        "DB_PASSWORD": "password-value", "DB_NAME": "n",
                        "PIPELINE_STATE_DIR": str(tmp_path / "state"),
                        "PIPELINE_OUTPUTS_DIR": str(tmp_path / "outputs")})


def stage_succeeds(record: RunRecord, stage: str, rows: int = 250) -> None:
    """What running a stage notebook successfully leaves behind."""
    record.stage_started(stage)
    rec = runs.StageRecord(record.settings, record.run_id, stage)
    rec.output({"uri": f"s3://b/{stage}", "inputs": [f"s3://b/before-{stage}"]})
    rec.update(rows_in=rows, rows_out=rows, step=stage)
    rec.save()
    (record.dir / f"{stage}.ipynb").write_text("{}")
    record.stage_ended(stage, "succeeded", 1.234)


def test_a_new_run_record_says_what_was_asked_and_shows_no_secrets(offline):
    record = RunRecord.open(offline, "run-1", ALL[:3], {"03_load": {"table": "t"}})
    text = record.path.read_text()
    saved = json.loads(text)
    assert saved["status"] == "running" and saved["requested_stages"] == ALL[:3]
    assert saved["parameters"] == {"03_load": {"table": "t"}}
    assert saved["stack"]["object_store"]["endpoint"] == "http://s3.invalid"
    for secret in offline.secrets():
        assert secret not in text


def test_a_succeeded_stage_takes_its_counts_objects_and_details_from_the_stage_record(offline):
    record = RunRecord.open(offline, "run-1", ALL[:2], {})
    stage_succeeds(record, "01_ingest", rows=250)
    entry = json.loads(record.path.read_text())["stages"]["01_ingest"]
    assert entry["status"] == "succeeded" and entry["duration_s"] == 1.23
    assert (entry["rows_in"], entry["rows_out"]) == (250, 250)
    assert entry["objects"][0]["uri"] == "s3://b/01_ingest" and entry["details"] == {"step": "01_ingest"}
    assert entry["ended"] is not None and "error" not in entry


def test_first_unfinished_points_at_the_failed_stage(offline):
    record = RunRecord.open(offline, "run-1", ALL, {})
    assert record.first_unfinished() == 0
    stage_succeeds(record, "01_ingest")
    stage_succeeds(record, "02_clean")
    record.stage_started("03_load")
    record.stage_ended("03_load", "failed", 0.5, "cell [4]: DatabaseError: boom")
    record.finish("failed")
    assert record.first_unfinished() == 2
    entry = record.data["stages"]["03_load"]
    assert entry["status"] == "failed" and entry["error"] == "cell [4]: DatabaseError: boom"
    assert entry["rows_in"] is None


def test_resuming_keeps_the_history_and_records_the_resume(offline):
    first = RunRecord.open(offline, "run-1", ALL[:3], {"03_load": {"table": "t"}})
    stage_succeeds(first, "01_ingest")
    first.stage_started("02_clean")
    (first.dir / "02_clean.ipynb").write_text("{}")
    first.stage_ended("02_clean", "failed", 0.1, "boom")
    first.data["preflight"] = ["database: down"]
    first.finish("failed")

    again = RunRecord.open(offline, "run-1", ["02_clean", "05_gold"], {"02_clean": {"min_records": 9}})
    assert again.data["status"] == "running" and len(again.data["resumed"]) == 1
    assert "preflight" not in again.data  # an earlier preflight failure is not this attempt's
    assert again.data["requested_stages"] == ["01_ingest", "02_clean", "03_load", "05_gold"]
    assert again.data["stages"]["01_ingest"]["status"] == "succeeded"
    # Stages run again take this invocation's parameters; the others keep theirs.
    assert again.data["parameters"] == {"03_load": {"table": "t"}, "02_clean": {"min_records": 9}, "05_gold": {}}
    assert again.first_unfinished() == 1

    again.keep_attempt("02_clean")  # the failed attempt's notebook is moved aside, not overwritten
    assert not (again.dir / "02_clean.ipynb").exists()
    assert (again.dir / "02_clean.attempt1.ipynb").exists()
    assert not runs.stage_path(offline, "run-1", "02_clean").exists()
    [kept] = again.data["stages"]["02_clean"]["attempts"]
    assert {k: kept[k] for k in ("attempt", "record", "notebook", "status", "error", "started")} == {
        "attempt": 1, "record": "stages/02_clean.attempt1.json", "notebook": "02_clean.attempt1.ipynb",
        "status": "failed", "error": "boom", "started": first.data["stages"]["02_clean"]["started"]}
    stage_succeeds(again, "02_clean")
    assert "error" not in again.data["stages"]["02_clean"]
    assert again.first_unfinished() == 2

    RunRecord.open(offline, "run-1", ["03_load"], {})
    assert len(runs.read_json(again.path)["resumed"]) == 2


def test_every_execution_of_a_stage_is_kept_as_an_attempt(offline):
    record = RunRecord.open(offline, "run-1", ALL[:1], {})
    record.keep_attempt("01_ingest")  # nothing to keep yet
    record.stage_started("01_ingest")
    assert record.data["stages"]["01_ingest"]["attempts"] == []
    record.stage_started("01_ingest")  # the first execution never ended: kept as abandoned
    [first] = record.data["stages"]["01_ingest"]["attempts"]
    assert first["status"] == "abandoned" and first["record"] == "stages/01_ingest.attempt1.json"
    stage_succeeds(record, "01_ingest")
    attempts = record.data["stages"]["01_ingest"]["attempts"]
    assert [a["status"] for a in attempts] == ["abandoned", "abandoned"]
    assert record.data["stages"]["01_ingest"]["status"] == "succeeded"
    assert record.data["stages"] == runs.derive_stages(offline, "run-1")


def test_finish_builds_lineage_and_copies_reconciliation(offline):
    record = RunRecord.open(offline, "run-1", ["01_ingest", "05_gold"], {})
    stage_succeeds(record, "01_ingest")
    record.stage_started("05_gold")
    rec = runs.StageRecord(offline, "run-1", "05_gold")
    rec.update(rows_in=1, rows_out=1, reconciliation=[{"hop": "gold", "status": "ok"}])
    rec.save()
    record.stage_ended("05_gold", "succeeded", 2)
    record.finish("succeeded")
    saved = runs.read_json(record.path)
    assert saved["status"] == "succeeded" and saved["ended"]
    assert saved["lineage"] == [{"stage": "01_ingest", "from": "s3://b/before-01_ingest", "to": "s3://b/01_ingest"}]
    assert saved["reconciliation"] == [{"hop": "gold", "status": "ok"}]
    assert record.first_unfinished() == 2
