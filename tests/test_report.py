"""lib.report: HTML pages of a run, built from its executed notebooks and manifest."""

from __future__ import annotations

import json

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

from lib import report, runs


@pytest.fixture
def run_dir(tmp_path):
    """A small run record: stage 1 succeeded with an output, stage 2 failed, stage 3 never ran."""
    nb = new_notebook(cells=[new_code_cell("print('250 records')", outputs=[
        new_output("stream", name="stdout", text="250 records <b>not markup</b>\n")])])
    nbformat.write(nb, tmp_path / "01_ingest.ipynb")
    nbformat.write(new_notebook(cells=[new_code_cell("1/0")]), tmp_path / "02_clean.ipynb")
    runs.write_json(tmp_path / "manifest.json", {
        "run_id": "r-1", "status": "failed", "started": "s", "ended": "e",
        "requested_stages": ["01_ingest", "02_clean", "03_load"],
        "stack": {"object_store": {"kind": "embedded SeaweedFS"}, "database": {"kind": "embedded PostgreSQL"},
                  "cloud": {"kind": "emulated"}},
        "stages": {"01_ingest": {"status": "succeeded", "duration_s": 1.5, "rows_in": 250, "rows_out": 250},
                   "02_clean": {"status": "failed", "error": "cell [3]: ValueError: <bad> & worse"}},
    })
    return tmp_path


def test_report_links_each_executed_notebook_and_summarises_the_stages(run_dir):
    index = report.write(run_dir)
    page = index.read_text()
    assert index == run_dir / "report.html"
    assert "Run r-1: failed" in page
    assert 'href="01_ingest.html"' in page and 'href="02_clean.html"' in page
    assert "03_load.html" not in page and "not run" in page
    assert "&lt;bad&gt; &amp; worse" in page and "<bad>" not in page  # text is escaped
    assert "Not reconciled" in page
    assert "250 records &lt;b&gt;not markup&lt;/b&gt;" in (run_dir / "01_ingest.html").read_text()


def test_report_shows_the_reconciliation_table(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["reconciliation"] = [{"hop": "gold", "records": "250", "fingerprint": "abc",
                                   "compared with": "cloud export", "status": "ok"}]
    runs.write_json(run_dir / "manifest.json", manifest)
    page = report.write(run_dir).read_text()
    assert "<td>gold</td><td>250</td><td>abc</td><td>cloud export</td><td>ok</td>" in page


def test_report_of_a_missing_run_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run record"):
        report.write(tmp_path / "nope")
