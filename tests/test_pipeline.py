"""lib.pipeline: --stages and -p parsing, preflight, and the run record that resume relies on."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lib import config, pipeline, runs
from lib.pipeline import RunRecord, UsageError

ALL = list(runs.STAGES)


# --- parse_stages ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("1-5", ALL),
    ("2-4", ALL[1:4]),
    ("3", ["03_load"]),
    ("1,3,5", ["01_ingest", "03_load", "05_gold"]),
    ("5, 1", ["01_ingest", "05_gold"]),
    ("2-3,3,1-2", ALL[:3]),
])
def test_parse_stages_gives_stage_names_in_pipeline_order(spec, expected):
    assert pipeline.parse_stages(spec) == expected


@pytest.mark.parametrize("spec, problem", [
    ("0", "no stage 0"),
    ("6", "no stage 6"),
    ("1-9", "no stage 6"),
    ("4-2", "runs backwards"),
    ("a", "not a stage number"),
    ("", "not a stage number"),
    ("1-", "not a stage number"),
    ("1,,2", "not a stage number"),
])
def test_parse_stages_refuses_bad_specs(spec, problem):
    with pytest.raises(UsageError, match=problem):
        pipeline.parse_stages(spec)


# --- parse_params ------------------------------------------------------------------------------------

def test_parse_params_types_values_as_the_notebooks_declare():
    out = pipeline.parse_params(["min_records=200", "max_total_seconds=2.5", "retire_missing=no",
                                 "write_mode=append", "table=my_table"], ALL)
    assert out["01_ingest"] == {"min_records": 200, "max_total_seconds": 2.5}
    assert out["02_clean"] == {"min_records": 200}
    assert out["03_load"] == {"retire_missing": False, "write_mode": "append", "table": "my_table"}
    assert out["04_export"] == {"table": "my_table"} and out["05_gold"] == {"table": "my_table"}
    assert isinstance(out["01_ingest"]["max_total_seconds"], float)


def test_parse_params_gives_each_chosen_stage_an_entry():
    assert pipeline.parse_params([], ["02_clean", "03_load"]) == {"02_clean": {}, "03_load": {}}


@pytest.mark.parametrize("pair, problem", [
    ("min_records=many", "expected a value of type int"),
    ("max_total_seconds=fast", "expected a value of type float"),
    ("retire_missing=maybe", "expected a value of type bool"),
    ("noequals", "use KEY=VALUE"),
    ("=5", "use KEY=VALUE"),
    ("run_id=x", "use --run-id"),
    ("colour=blue", "no chosen stage has a parameter 'colour'; known: "),
    ("table=a;drop", "table 'a;drop' is not allowed"),
    ('table=Robert"); --', "is not allowed"),
    ("db_schema=Public", "schema 'Public' is not allowed"),
    ("write_mode=merge", "write_mode 'merge' is not one of upsert, append, replace"),
    ("backfill_date=2025-1-1", "not YYYY-MM-DD"),
    ("snapshot_fallback=sometimes", "not auto, true or false"),
    ("api_url=https://restcountries.com/v3.1/all", "1 to 10 fields"),
    ("max_invalid_fraction=1.5", "not between 0 and 1"),
    ("max_invalid_fraction=nan", "not between 0 and 1"),
    ("min_records=0", "min_records 0 must be at least 1"),
    ("max_attempts=0", "max_attempts 0 must be at least 1"),
    ("preview_rows=-1", "preview_rows -1 must not be negative"),
    ("read_timeout=0", "read_timeout 0.0 must be more than 0"),
    ("max_total_seconds=-5", "max_total_seconds -5.0 must be more than 0"),
])
def test_parse_params_refuses_bad_values_before_anything_runs(pair, problem):
    with pytest.raises(UsageError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        pipeline.parse_params([pair], ALL)


def test_a_parameter_of_a_stage_not_chosen_is_refused():
    with pytest.raises(UsageError, match="no chosen stage has a parameter 'write_mode'"):
        pipeline.parse_params(["write_mode=append"], ["01_ingest", "02_clean"])


def test_unknown_parameter_error_lists_the_known_ones_without_run_id():
    with pytest.raises(UsageError) as err:
        pipeline.parse_params(["nope=1"], ["05_gold"])
    assert "known: preview_rows, table" in str(err.value)


def test_an_empty_value_is_allowed_where_empty_means_default():
    out = pipeline.parse_params(["api_url=", "backfill_date="], ["01_ingest", "02_clean"])
    assert out == {"01_ingest": {"api_url": ""}, "02_clean": {"backfill_date": ""}}


# --- the run record ------------------------------------------------------------------------------------

@pytest.fixture
def offline(tmp_path):
    return config.load({"MINIO_URL": "http://s3.invalid", "MINIO_ACCESS_KEY": "access-value",
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
    assert "rows_in" not in entry


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
    assert again.data["stages"]["02_clean"]["attempts"] == [
        {"notebook": "02_clean.attempt1.ipynb", "status": "failed", "error": "boom",
         "started": first.data["stages"]["02_clean"]["started"]}]
    stage_succeeds(again, "02_clean")
    assert "error" not in again.data["stages"]["02_clean"]
    assert again.first_unfinished() == 2

    RunRecord.open(offline, "run-1", ["03_load"], {})
    assert len(runs.read_json(again.path)["resumed"]) == 2


def test_keep_attempt_without_an_earlier_notebook_does_nothing(offline):
    record = RunRecord.open(offline, "run-1", ALL[:1], {})
    record.keep_attempt("01_ingest")
    record.stage_started("01_ingest")
    record.keep_attempt("01_ingest")
    assert record.data["stages"]["01_ingest"]["attempts"] == []


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


def test_summary_line_shows_rows_objects_snapshot_and_errors():
    ok = pipeline.summary_line("01_ingest", {"status": "succeeded", "duration_s": 1.5, "rows_in": 250,
                                             "rows_out": 250, "objects": [{"uri": "s3://raw/k"}],
                                             "details": {"origin": "snapshot"}})
    assert "rows 250 → 250" in ok and "s3://raw/k" in ok and "BUNDLED SNAPSHOT" in ok
    failed = pipeline.summary_line("03_load", {"status": "failed", "duration_s": 0.2, "error": "x" * 500})
    assert "failed" in failed and "x" * 200 in failed and "x" * 201 not in failed


# --- preflight (real services) ----------------------------------------------------------------------

def test_preflight_with_every_service_up_finds_no_problem(settings):
    assert pipeline.preflight(settings, ALL) == []


def test_preflight_names_an_unreachable_api_when_fallback_is_off(settings):
    off = dataclasses.replace(settings, snapshot_fallback=False)
    problems = pipeline.preflight(off, ["01_ingest"], api_url="http://127.0.0.1:9/v3.1/all?fields=name")
    assert len(problems) == 1 and "unreachable" in problems[0] and "fallback is off" in problems[0]
    on = dataclasses.replace(settings, snapshot_fallback=True)
    assert pipeline.preflight(on, ["01_ingest"], api_url="http://127.0.0.1:9/v3.1/all?fields=name") == []


def test_preflight_names_a_database_that_refuses_the_password(settings):
    db = dataclasses.replace(settings.db, password=config.Secret("not-the-password"))
    wrong = dataclasses.replace(settings, db=db)
    problems = pipeline.preflight(wrong, ["03_load"])
    assert len(problems) == 1 and problems[0].startswith("database:")
    assert "password authentication failed" in problems[0] and ":***@" in problems[0]
    assert "not-the-password" not in problems[0]
