"""lib.review: run summaries read from manifests, the `runs` table, the text of a diff."""

from __future__ import annotations

import pytest

from lib import registry, review, runs


def manifest(run_id, started, *, status="succeeded", origin=None, source="api", quarantined=0, error=None):
    stages = {
        "01_ingest": {"status": "succeeded", "duration_s": 1.0, "rows_out": 250,
                      "details": {"origin": source, "fallback_reason": "GET failed" if source == "snapshot" else None,
                                  "attempts": [{"attempt": 1, "status": 503}, {"attempt": 2, "status": 503}]}},
        "02_clean": {"status": "succeeded", "duration_s": 2.0, "rows_out": 250 - quarantined,
                     "details": {"quarantined": quarantined}},
    }
    if error:
        stages["03_load"] = {"status": "failed", "duration_s": 0.5, "error": error}
    data = {"run_id": run_id, "status": status, "started": started, "ended": started.replace(":00.000", ":09.500"),
            "requested_stages": list(registry.NAMES), "stages": stages}
    if origin:
        data["origin"] = origin
    return data


def write(outputs, data):
    runs.write_json(runs.manifest_path(outputs, data["run_id"]), data)


def test_summaries_are_newest_first_and_say_how_each_run_went(tmp_path):
    write(tmp_path, manifest("a-1", "2026-11-28T10:00:00.000+00:00", source="snapshot", quarantined=2))
    write(tmp_path, manifest("b-2", "2026-11-28T11:00:00.000+00:00", origin="JupyterLab", status="failed",
                             error="cell [5]: DatabaseError: <boom>"))
    (runs.runs_dir(tmp_path) / "not-a-run.txt").write_text("x")
    first, second = review.summaries(tmp_path)[0], review.summaries(tmp_path)[1]
    assert [first["run_id"], second["run_id"]] == ["b-2", "a-1"]
    assert first["origin"] == "JupyterLab" and second["origin"] == "runner"
    assert second["source"] == "snapshot" and second["quarantined"] == 2 and second["attempts"] == 2
    assert second["rows"] == {"raw": 250, "clean": 248, "table": None, "export": None, "gold": None}
    assert second["duration_s"] == 9.5
    assert first["failed"] == {"stage": "03_load", "error": "cell [5]: DatabaseError: <boom>"}
    assert first["unpublished"] == ["03_load", "04_export", "05_gold"]
    assert second["added"] is None  # stage 5 did not run: not known, not zero


def test_runs_table_lines_up_one_run_per_line(tmp_path):
    assert "no runs yet" in review.runs_table([])
    write(tmp_path, manifest("a-1", "2026-11-28T10:00:00.000+00:00", source="snapshot", quarantined=2))
    write(tmp_path, manifest("b-2", "2026-11-28T11:00:00.000+00:00"))
    lines = review.runs_table(review.summaries(tmp_path)).splitlines()
    assert lines[0].split()[:5] == ["run", "started", "(UTC)", "how", "status"]
    assert lines[2].startswith("b-2") and lines[3].startswith("a-1")
    assert "SNAPSHOT!" in lines[3] and "SNAPSHOT!" not in lines[2]
    assert len({line.index("status") if "status" in line else None for line in lines[:1]}) == 1


def test_diff_text_shows_old_and_new_values():
    text = review.diff_text({"from": "a", "to": "b", "from_uri": "s3://gold/a.csv", "to_uri": "s3://gold/b.csv",
                             "previous_run_id": "a", "added": ["Xland"], "removed": ["Yland"],
                             "changed": {"France": {"population": [1, 2], "capital": [["Paris"], ["Lyon"]]}}})
    assert text.splitlines()[0] == "a → b: 1 added, 1 removed, 1 changed"
    assert "+ Xland" in text and "- Yland" in text and "~ France" in text
    assert "    population: 1 → 2" in text and '    capital: ["Paris"] → ["Lyon"]' in text


HOSTILE = "Evil\rLand\x1b[31m\u202eRed"  # a carriage return, a colour, a right-to-left override
SHOWN = "Evil\\rLand\\x1b[31m\\u202eRed"


def test_diff_text_escapes_control_characters_of_keys_fields_and_values():
    text = review.diff_text({"from": "a", "to": "b", "from_uri": "s3://gold/a.csv", "to_uri": "s3://gold/b.csv",
                             "added": [HOSTILE], "removed": [HOSTILE + "2"],
                             "changed": {HOSTILE: {"capital": [["Old\u202e"], [HOSTILE]]}}})
    assert [line for line in text.splitlines() if "Evil" in line] == [
        f"+ {SHOWN}", f"- {SHOWN}2", f"~ {SHOWN}", f'    capital: ["Old\\u202e"] → ["Evil\\rLand\\u001b[31m\\u202eRed"]']
    assert not any(c in text for c in "\r\x1b\u202e")


def test_runs_table_escapes_what_the_records_say(tmp_path):
    write(tmp_path, {**manifest("a-1", "2026-11-28T10:00:00.000+00:00"), "origin": HOSTILE, "status": "failed\x1b[2J"})
    text = review.runs_table(review.summaries(tmp_path))
    assert SHOWN in text and "failed\\x1b[2J" in text and not any(c in text for c in "\r\x1b\u202e")
    header, rule, row = text.splitlines()
    assert len(rule) >= len(row.split("  ")[0])  # the columns line up with the escaped text


# --- a run named by its short id ----------------------------------------------------------------------

def test_a_run_is_found_by_its_id_or_the_short_id_the_trend_pictures_show(tmp_path):
    from lib import charts

    ids = ["20261128T055400Z-a1b2c3", "20261128T061000Z-d4e5f6", "lab-20261128T070000Z-a1b2c4"]
    for n, run_id in enumerate(ids):
        write(tmp_path, manifest(run_id, f"2026-11-28T0{5 + n}:00:00.000+00:00"))
    label = charts._labels(review.summaries(tmp_path))[-1].splitlines()[-1]  # the oldest run's tick
    assert label == "a1b2c3" and review.find_run(tmp_path, label) == ids[0]
    assert review.find_run(tmp_path, ids[1]) == ids[1]
    assert review.find_run(tmp_path, "d4e5f6") == ids[1]
    assert review.find_run(tmp_path, "lab-2026") == ids[2]  # the beginning of one


def test_a_name_that_is_no_run_or_fits_several_is_said_as_such(tmp_path):
    for run_id in ("20261128T055400Z-a1b2c3", "20261129T055400Z-ffb2c3"):
        write(tmp_path, manifest(run_id, "2026-11-28T05:00:00.000+00:00"))
    with pytest.raises(review.UnknownRun, match=r"^no such run: 0a0a0a \("):
        review.find_run(tmp_path, "0a0a0a")
    with pytest.raises(review.UnknownRun) as ambiguous:
        review.find_run(tmp_path, "b2c3")
    assert str(ambiguous.value) == "b2c3 names more than one run: 20261128T055400Z-a1b2c3, 20261129T055400Z-ffb2c3"
    assert ambiguous.value.exit_code == 2
    with pytest.raises(review.UnknownRun, match="no such run"):
        review.find_run(tmp_path / "nothing-yet", "a1b2c3")
