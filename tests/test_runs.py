"""lib.runs: run ids, run folders, atomic JSON and the stage records stages leave behind."""

from __future__ import annotations

import os
import re
import time
from datetime import datetime, timezone

import pytest

from lib import config, names, runs, storage
from lib.names import InvalidName


@pytest.fixture
def settings(tmp_path):
    """Settings whose outputs live in tmp_path; no service is contacted by lib.runs."""
    return config.load({"MINIO_URL": "http://s3.invalid", "MINIO_ACCESS_KEY": "a", "MINIO_SECRET_KEY": "b",
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


def test_resolve_run_id(settings):
    assert runs.resolve_run_id(settings, "given-1", "03_load") == "given-1"
    with pytest.raises(InvalidName):
        runs.resolve_run_id(settings, "bad/id", "03_load")
    with pytest.raises(ValueError, match="run 01_ingest first"):
        runs.resolve_run_id(settings, "", "02_clean")
    new = runs.resolve_run_id(settings, "", "01_ingest")
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", new)
    runs.StageRecord(settings, "r-latest", "01_ingest").save()
    assert runs.resolve_run_id(settings, "", "02_clean") == "r-latest"


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
