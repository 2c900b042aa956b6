"""lib.stages.context: what a notebook's last cell shows of its stage record."""

from __future__ import annotations

from lib.stages import context

HOSTILE = '<img src=x onerror="window.pwned=1"><script>window.pwned=1</script>'


def test_a_stage_record_displays_as_tables_with_whole_uris_and_escaped_values(tmp_path):
    uri = "s3://clean/countries/ingest_date=2026-11-28/run_id=" + "x" * 80 + "/capitals_clean.csv"
    view = context.RecordView(tmp_path / "02_clean.json", {
        "stage": "02_clean", "run_id": "r", "rows_in": 251, "rows_out": 250,
        "artifacts": [{"uri": uri, "size": 10, "sha256": "a" * 64, "rows": 250, "inputs": []}],
        "details": {"quarantined": 1, "note": HOSTILE,
                    "attempts": [{"attempt": 1, "status": 503}, {"attempt": 2, "status": 200}]}})
    assert view == str(tmp_path / "02_clean.json")  # still the record's path
    page = view._repr_html_()
    assert uri in page and "a" * 64 in page and "<script" not in page and "&lt;script&gt;" in page
    assert "<b>attempts</b>" in page and "503" in page
    assert uri in repr(view) and "rows 251 → 250" in repr(view)
