"""lib.report: HTML pages of a run, built from its executed notebooks and manifest."""

from __future__ import annotations

import json
import os

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


HOSTILE = '<img src=x onerror="window.pwned=1"><script>window.pwned=1</script>'


def test_index_lists_runs_newest_first_with_every_outside_string_escaped(tmp_path):
    for run_id, started, source in (("a-1", "2026-11-28T10:00:00+00:00", "snapshot"),
                                    ("b-2", "2026-11-28T11:00:00+00:00", "api")):
        runs.write_json(runs.manifest_path(tmp_path, run_id), {
            "run_id": run_id, "status": "failed" if source == "api" else "succeeded", "started": started,
            "ended": started, "origin": HOSTILE, "requested_stages": ["01_ingest", "02_clean"],
            "stages": {"01_ingest": {"status": "succeeded", "duration_s": 1.2, "rows_out": 250,
                                     "details": {"origin": source, "fallback_reason": HOSTILE}},
                       "02_clean": {"status": "failed", "error": f"cell [3]: ValueError: {HOSTILE}"}
                       if source == "api" else {"status": "succeeded", "rows_out": 249, "details": {"quarantined": 1}}}})
    index = report.write_all(tmp_path)
    page = index.read_text()
    assert index == tmp_path / "index.html"
    assert page.index('href="runs/b-2/report.html"') < page.index('href="runs/a-1/report.html"')
    assert "SNAPSHOT" in page and "1 of these runs used the bundled snapshot" in page
    assert "<script>" not in page and "<img src=x" not in page and "&lt;img src=x onerror=" in page
    assert 'src="trend-rows.png"' in page and (tmp_path / "trend-rows.png").exists()
    for run_id in ("a-1", "b-2"):
        text = (runs.run_dir(tmp_path, run_id) / "report.html").read_text()
        assert "<script" not in text and "<img src=x" not in text
    failed = (runs.run_dir(tmp_path, "b-2") / "report.html").read_text()
    assert "Left unpublished" in failed and "&lt;script&gt;" in failed


def test_a_long_error_in_the_index_is_cut_at_a_word(tmp_path):
    error = "cell [5]: OperationalError: the current transaction is aborted, commands ignored " * 8
    runs.write_json(runs.manifest_path(tmp_path, "c-3"), {
        "run_id": "c-3", "status": "failed", "started": "2026-11-28T10:00:00+00:00", "requested_stages": ["03_load"],
        "stages": {"03_load": {"status": "failed", "error": error}}})
    page = report.write_index(tmp_path).read_text()
    shown = page.split("at 03_load: ", 1)[1].split("</small>", 1)[0]
    assert shown.endswith("…") and len(shown) <= report.MAX_ERROR
    words = shown[:-1].split()
    assert words == error.split()[:len(words)]  # every word whole

def test_lineage_picture_escapes_uris_and_draws_every_hop():
    svg = report.lineage_svg({"run_id": "r", "stages": {
        "01_ingest": {"objects": [{"uri": f"s3://raw/{HOSTILE}.json", "inputs": ["bundled snapshot lib/data/x"]}]},
        "02_clean": {"objects": [{"uri": "s3://clean/q/quarantine/x.csv"}]}},
        "lineage": [{"from": "bundled snapshot lib/data/x", "to": f"s3://raw/{HOSTILE}.json"},
                    {"from": f"s3://raw/{HOSTILE}.json", "to": "s3://clean/q/quarantine/x.csv"}]})
    assert svg.count("<rect") == 3 and svg.count("<line") == 2
    assert "<script" not in svg and "<img" not in svg and "bundled snapshot" in svg


def test_pages_get_nbconvert_ready_at_once_and_render_every_notebook_when_the_stages_are_done(run_dir):
    """nbconvert is made ready in the background as soon as the run's `Pages` exist; no page is
    rendered before `done`, which renders every executed notebook of the run (attempts included)
    as it is then, and `write` uses those pages."""
    pages = report.Pages(run_dir)
    # The warm-up ran first in the pages' thread, which now has its exporter.
    assert pages.pool.submit(lambda: getattr(report._LOCAL, "exporter", None)).result(timeout=60) is not None
    assert not list(run_dir.glob("*.html"))
    # 02_clean runs again (its first attempt kept) after the pages were set up.
    os.replace(run_dir / "02_clean.ipynb", run_dir / "02_clean.attempt1.ipynb")
    nbformat.write(new_notebook(cells=[new_code_cell("print('again')", outputs=[
        new_output("stream", name="stdout", text="second attempt\n")])]), run_dir / "02_clean.ipynb")
    rendered = pages.done()
    assert rendered == {stem: f"{stem}.html" for stem in ("01_ingest", "02_clean", "02_clean.attempt1")}
    assert "250 records &lt;b&gt;not markup&lt;/b&gt;" in (run_dir / "01_ingest.html").read_text()
    assert "second attempt" in (run_dir / "02_clean.html").read_text()
    page = report.write(run_dir, rendered).read_text()
    assert 'href="01_ingest.html"' in page and 'href="02_clean.html"' in page and "02_clean.attempt1.html" in page


def test_a_notebook_page_keeps_nbconvert_accessibility_without_its_second_parse(tmp_path):
    """The page exporter skips HTMLExporter's BeautifulSoup pass; what that pass adds (alt text on
    images without any, a tab stop on each input and output) is still there, in the same places."""
    from nbconvert import HTMLExporter
    from nbformat.v4 import new_markdown_cell

    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    nb = new_notebook(cells=[
        new_markdown_cell("# Stage\nSome *text*."),
        new_code_cell("x = 1\nx", outputs=[
            new_output("execute_result", data={"text/plain": "1", "text/html": "<b>1</b>"},
                       execution_count=1),
            new_output("display_data", data={"image/png": png, "text/plain": "<Figure>"}),
            new_output("stream", name="stderr", text="a warning\n")]),
    ], metadata={"language_info": {"name": "python", "pygments_lexer": "ipython3"}})
    path = tmp_path / "05_gold.ipynb"
    nbformat.write(nb, path)

    assert report.notebook_page(path) == "05_gold.html"
    page = (tmp_path / "05_gold.html").read_text()
    stock, _ = HTMLExporter().from_filename(str(path))
    assert page.count('tabindex="0"') == stock.count('tabindex="0"') == 5  # two inputs, three outputs
    assert page.count(f'alt="{report.NO_ALT}"') == stock.count(f'alt="{report.NO_ALT}"') == 1
    assert "<b>1</b>" in page and "Some <em>text</em>" in page and "a warning" in page
    assert '<span class="n">x</span>' in page  # the code is highlighted (by pygments' Python lexer)


def test_accessible_adds_alt_text_and_tab_stops_only_where_missing():
    page = ('<div class="jp-Cell-inputWrapper"><img src="a.png"><img alt="kept" src="b.png"></div>'
            '<div class="jp-RenderedText jp-OutputArea-output" data-mime-type="text/plain">'
            '<div class="jp-OutputArea-outputs-not">x</div>')
    out = report.accessible(page)
    assert out.count('tabindex="0"') == 2
    assert '<div class="jp-OutputArea-outputs-not">' in out
    assert f'<img alt="{report.NO_ALT}" src="a.png">' in out and '<img alt="kept" src="b.png">' in out


def test_trend_tick_labels_stay_apart_and_always_name_the_newest_run():
    from lib import charts

    rows = [{"started": f"2026-11-28T10:{i:02d}:00+00:00", "run_id": f"r-{i:06d}"} for i in range(30)]
    few = charts._labels(rows[:charts.MAX_LABELS])
    assert all(few) and few[-1] == "11-28 10:11\n000011"  # a label under every run's tick
    many = charts._labels(rows)
    shown = [label for label in many if label]
    assert len(many) == 30 and 1 < len(shown) <= charts.MAX_LABELS
    assert many[-1] == "11-28 10:29\n000029" and many[0] == ""  # counted from the newest
    at = [k for k, label in enumerate(many) if label]
    assert len({b - a for a, b in zip(at, at[1:])}) == 1  # evenly spaced
    # A chart gets ticks under the labelled runs only, and still spans every run.
    plt = charts._pyplot()
    fig, ax = plt.subplots()
    charts._xticks(ax, rows)
    assert list(ax.get_xticks()) == at and [t.get_text() for t in ax.get_xticklabels()] == shown
    assert ax.get_xlim()[0] < 0 and ax.get_xlim()[1] > 29
    plt.close(fig)


def test_lineage_picture_puts_another_runs_input_in_the_column_of_its_layer():
    """A run that started at stage 3 read another run's silver: that input is drawn in the silver
    column, not the source's."""
    clean = "s3://clean/countries/run_id=other/capitals_clean.parquet"
    table = "postgresql://127.0.0.1:5432/countries/public.capitals_clean"
    picture = report._lineage({"run_id": "r", "stages": {"03_load": {"objects": [{"uri": table, "inputs": [clean]}]}},
                               "lineage": [{"stage": "03_load", "from": clean, "to": table}]})
    x = {box["uri"]: box["x"] for box in picture["boxes"]}
    columns = [c["x"] for c in picture["columns"]]
    assert x[table] == columns[3] and x[clean] == columns[2]


def test_a_change_report_of_a_million_removals_shows_its_first_rows_and_says_so():
    """A rerun that retires most countries: the run page's table holds the first rows, in the change
    report's order, and says that changes.json lists every one."""
    from lib import changes

    big = {"previous_run_id": "r1", "added": ["Atlantis"], "removed": [f"Country {i:07d}" for i in range(900_000)],
           "changed": {"France": {"population": [1, 2]}}, "held": {}}
    shown = report.change_rows(big)
    assert shown["cut"] and len(shown["rows"]) == report.CHANGE_ROWS_SHOWN
    assert shown["rows"] == changes.listed(big, report.CHANGE_ROWS_SHOWN)
    small = report.change_rows({**big, "removed": ["Aruba"]})
    assert not small["cut"] and len(small["rows"]) == 3
