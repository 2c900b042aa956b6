"""The review pages and commands, checked as a reviewer meets them: three real runs through
`run_pipeline.py` (shared by the whole module), then outputs/index.html, each report.html, the
quarantine pages and the executed notebooks' pages opened in a real headless Chromium.

The runs: (1) the API answers 503 with hostile HTML twice and the bundled snapshot is used; (2) the API
answers with one country changed, one gone, one added with a hostile name and one hostile record that
breaks the contract; (3) the API answers with a hostile HTML page, so stage 1 fails.
"""

from __future__ import annotations

import copy
import json
import shutil
import uuid
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from lib import config, registry, report, runs
from tests.api_server import Scripted
from tests.browser import launch, visit
from tests.conftest import ROOT

PWNED = "window.pwned=1;document.title='pwned'"
SCRIPT = f"<script>{PWNED}</script>"
IMG = f'<img src=x onerror="{PWNED}">'


def _run(*args: str):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), *args], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def three_runs(embedded, api):
    unique = uuid.uuid4().hex[:8]
    table = f"review_{unique}"
    ids = [f"review-{unique}-{n}" for n in (1, 2, 3)]
    outputs = config.outputs_dir()

    # 1. API down (503 with hostile bodies): the snapshot is used, after two attempts.
    api.reset()
    api.queue(*[Scripted(503, (IMG + SCRIPT).encode(), {"Content-Type": "text/html"})] * 3)
    first = _run("--run-id", ids[0], "-p", f"table={table}", "-p", "snapshot_fallback=true",
                 "-p", "max_attempts=2")
    assert first.returncode == 0, first.stderr[-3000:]

    # 2. The API again, with changes and hostile records.
    api.reset()
    records = [r for r in api.records if r["name"]["common"] != "Zimbabwe"]
    france = next(r for r in records if r["name"]["common"] == "France")
    france["population"] += 1000
    added = copy.deepcopy(france)
    added["name"] = {"common": IMG, "official": SCRIPT}
    broken = copy.deepcopy(france)
    broken["name"] = {"common": SCRIPT, "official": IMG}
    broken["population"] = -1
    api.records = records + [added, broken]
    second = _run("--run-id", ids[1], "-p", f"table={table}")
    assert second.returncode == 0, second.stderr[-3000:]

    # 3. The API answers with a hostile HTML page: stage 1 fails, nothing is published.
    api.reset()
    api.queue(*[Scripted(200, (IMG + SCRIPT).encode(), {"Content-Type": "text/html"})] * 2)
    third = _run("--run-id", ids[2], "-p", f"table={table}")
    assert third.returncode == 1, third.stderr[-3000:]
    api.reset()
    return {"ids": ids, "outputs": outputs, "table": table, "france": france["population"],
            "results": [first, second, third]}


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = launch(p)
        yield chromium
        chromium.close()


def page_of(three_runs, n: int, name: str = "report.html") -> Path:
    return runs.run_dir(three_runs["outputs"], three_runs["ids"][n]) / name


def assert_safe(shown) -> None:
    """Loaded with no console error, no hostile script ran, and every local link names a file."""
    assert shown.errors == [], (shown.path, shown.errors)
    assert shown.page.title() != "pwned", shown.path
    assert shown.page.evaluate("typeof window.pwned") == "undefined", shown.path
    missing = [link for link, target in shown.local_targets() if not target.exists()]
    assert missing == [], (shown.path, missing)


def test_progress_is_printed_while_the_run_goes(three_runs):
    err = three_runs["results"][1].stderr
    for stage in registry.NAMES:
        assert f"{stage}: started" in err and f"{stage}: done in " in err, err[-2000:]
    assert "running already" in err or "ready in" in err
    failed = three_runs["results"][2].stderr
    assert "01_ingest: FAILED in cell [" in failed


def test_index_lists_every_run_newest_first_with_source_status_and_counts(three_runs, browser):
    index = three_runs["outputs"] / "index.html"
    shown = visit(browser, index)
    assert_safe(shown)
    rows = shown.page.eval_on_selector_all("#runs tbody tr", "trs => trs.map(t => t.innerText)")
    ids = three_runs["ids"]
    mine = [next(i for i, r in enumerate(rows) if r.startswith(rid)) for rid in ids]
    assert mine == sorted(mine, reverse=True)  # newest first
    first, second, third = (rows[i] for i in mine)
    assert "SNAPSHOT" in first and "succeeded" in first
    assert "API" in second and "succeeded" in second
    assert "failed" in third and "01_ingest" in third and IMG in third  # the error, as text
    cells = second.split("\t")
    assert cells[5:10] == ["251", "250", "250", "250", "250"]  # raw, clean, table, export, gold
    assert cells[10:14] == ["1", "1", "1", "1"]  # quarantined, added, removed, changed
    for picture in ("trend-rows.png", "trend-durations.png", "trend-regions.png"):
        assert (three_runs["outputs"] / picture).stat().st_size > 1000
    # Every report and notebook page the index links to opens, safely.
    for link, target in shown.local_targets():
        if any(f"runs/{rid}/" in link for rid in ids) and target.suffix == ".html":
            assert_safe(visit(browser, target))


def test_report_answers_the_three_questions(three_runs, browser):
    shown = visit(browser, page_of(three_runs, 1))
    assert_safe(shown)
    text = shown.text()
    # Anything quarantined? Yes, one, with a link to the record and its reason.
    assert "1 record quarantined" in shown.page.inner_text("#quarantine-answer")
    quarantine = visit(browser, page_of(three_runs, 1, "quarantine.html"))
    assert_safe(quarantine)
    rows = quarantine.page.eval_on_selector_all("#quarantined tbody tr", "trs => trs.map(t => t.innerText)")
    assert len(rows) == 1 and SCRIPT in rows[0] and "population must be a whole number >= 0" in rows[0]
    # What changed? One added, one removed, one changed field, old → new.
    assert "1 added, 1 removed, 1 changed" in shown.page.inner_text("#changes-answer")
    assert three_runs["ids"][0] in shown.page.inner_text("#changes-answer")
    changes = shown.page.eval_on_selector_all("#changes tbody tr", "trs => trs.map(t => t.innerText.split('\\t'))")
    assert [IMG, "added", "", "", ""] in changes
    assert ["Zimbabwe", "removed", "", "", ""] in changes
    assert ["France", "changed", "population", str(three_runs["france"] - 1000), str(three_runs["france"])] in changes
    # Where is my data? Every object of the manifest, its URI and sha256 whole.
    manifest = json.loads(page_of(three_runs, 1, "manifest.json").read_text())
    objects = [o for s in manifest["stages"].values() for o in s["objects"]]
    listed = shown.page.eval_on_selector_all("#objects tbody tr", "trs => trs.map(t => t.innerText.split('\\t'))")
    assert len(listed) == len(objects) >= 9
    for obj, row in zip(objects, listed):
        assert row[1] == obj["uri"] and (obj.get("sha256") or "") == row[3]
    assert "Reconciliation" in text and shown.page.locator("svg[role=img] g").count() >= 9  # lineage boxes


def test_a_snapshot_run_is_announced_loudly_and_shows_its_attempts(three_runs, browser):
    shown = visit(browser, page_of(three_runs, 0))
    assert_safe(shown)
    banner = shown.page.inner_text("#source")
    assert "BUNDLED SNAPSHOT USED" in banner and "HTTP 503" in banner and IMG in banner
    assert "Nothing quarantined" in shown.page.inner_text("#quarantine-answer")
    assert "the first gold table" in shown.page.inner_text("#changes-answer")
    notebook = visit(browser, page_of(three_runs, 0, "01_ingest.html"))
    assert_safe(notebook)
    text = notebook.text()
    assert "uses the bundled offline snapshot" in text and SCRIPT in text  # the reason, escaped
    assert "wait_before_next_s" in text and "503" in text  # the request attempts
    assert " - INFO - " not in text  # no timestamped log lines when nothing went wrong


def test_a_failed_run_says_which_stage_and_cell_failed_and_what_was_left_unpublished(three_runs, browser):
    shown = visit(browser, page_of(three_runs, 2))
    assert_safe(shown)
    failure = shown.page.inner_text("#failure")
    assert "Stage 01_ingest failed in cell [" in failure and "PayloadError" in failure and IMG in failure
    assert "Left unpublished" in failure and "05_gold" in failure and "--resume " + three_runs["ids"][2] in failure
    assert "No object was written" in shown.text()
    assert_safe(visit(browser, page_of(three_runs, 2, "01_ingest.html")))


def test_every_notebook_page_of_the_hostile_run_is_safe_and_shows_uris_whole(three_runs, browser):
    for stage in registry.NAMES:
        shown = visit(browser, page_of(three_runs, 1, f"{stage}.html"))
        assert_safe(shown)
        manifest = json.loads(page_of(three_runs, 1, "manifest.json").read_text())
        text = shown.text()
        for obj in manifest["stages"][stage]["objects"]:
            assert obj["uri"] in text, (stage, obj["uri"])  # the last cell shows the record, URIs whole
    assert SCRIPT in visit(browser, page_of(three_runs, 1, "02_clean.html")).text()  # the quarantine preview


WINDOW = 1280  # a laptop's window: every page fits it without scrolling sideways
OVERFLOW = """() => ({
  page: document.documentElement.scrollWidth,
  cells: [...document.querySelectorAll('.jp-OutputArea-output')].filter(e => e.scrollWidth > e.clientWidth + 1)
         .map(e => `${e.scrollWidth}px: ${e.innerText.slice(0, 80)}`),
  beyond: [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > innerWidth + 1)
          .slice(-3).map(e => `${e.tagName}.${e.className}: ${e.innerText.slice(0, 80)}`)})"""


def test_every_page_fits_a_1280_px_window_and_no_notebook_output_scrolls_sideways(three_runs, browser):
    paths = [three_runs["outputs"] / "index.html"]
    for n in range(3):
        paths += [page_of(three_runs, n), *sorted(page_of(three_runs, n).parent.glob("0*.html"))]
    paths.append(page_of(three_runs, 1, "quarantine.html"))
    assert len(paths) >= 12
    for path in paths:
        shown = visit(browser, path, width=WINDOW, height=800)
        found = shown.page.evaluate(OVERFLOW)
        assert found["page"] <= WINDOW and found["cells"] == [], (str(path), found)
        shown.page.close()


def test_an_index_of_a_month_of_runs_with_their_real_ids_fits_the_window(three_runs, browser, tmp_path):
    """Thirty runs named as the runner and JupyterLab name them (`lab-20261206T060403Z-a1b2c3`), each a
    copy of one of the three runs' records."""
    for n in range(30):
        run_id = runs.new_run_id(origin=("runner", "jupyterlab")[n % 2])
        target = runs.run_dir(tmp_path, run_id)
        shutil.copytree(runs.run_dir(three_runs["outputs"], three_runs["ids"][n % 3]), target)
        manifest = runs.read_json(target / "manifest.json")
        runs.write_json(target / "manifest.json", {**manifest, "run_id": run_id})
    shown = visit(browser, report.write_index(tmp_path), width=WINDOW, height=800)
    assert shown.page.locator("#runs tbody tr").count() == 30
    found = shown.page.evaluate(OVERFLOW)
    assert found["page"] <= WINDOW, found


def test_runs_and_diff_commands(three_runs):
    ids = three_runs["ids"]
    table = _run("runs")
    assert table.returncode == 0
    lines = [next(i for i, line in enumerate(table.stdout.splitlines()) if line.startswith(rid)) for rid in ids]
    assert lines == sorted(lines, reverse=True)
    as_json = json.loads(_run("runs", "--json").stdout)
    mine = {r["run_id"]: r for r in as_json if r["run_id"] in ids}
    assert mine[ids[0]]["source"] == "snapshot" and mine[ids[1]]["quarantined"] == 1
    assert mine[ids[2]]["failed"]["stage"] == "01_ingest"

    diff = _run("diff", ids[0], ids[1])
    assert diff.returncode == 0, diff.stderr
    out = diff.stdout
    assert "1 added, 1 removed, 1 changed" in out
    assert f"+ {IMG}" in out and "- Zimbabwe" in out and "~ France" in out
    assert f"population: {three_runs['france'] - 1000} → {three_runs['france']}" in out
    backwards = json.loads(_run("diff", ids[1], ids[0], "--json").stdout)
    assert backwards["added"] == ["Zimbabwe"] and backwards["removed"] == [IMG]
    missing = _run("diff", ids[0], ids[2])
    assert missing.returncode == 1 and "has no gold table" in missing.stderr
    assert _run("diff", ids[0], "../etc").returncode == 2


def test_diff_and_report_take_a_short_id_and_say_when_a_name_is_no_run(three_runs):
    ids = three_runs["ids"]
    short = [rid.split("-", 1)[1] for rid in ids]  # "<unique>-1": the end of one run's id
    diff = _run("diff", short[0], short[1], "--json")
    assert diff.returncode == 0, diff.stderr
    shown = json.loads(diff.stdout)
    assert (shown["from"], shown["to"]) == (ids[0], ids[1]) and shown["removed"] == ["Zimbabwe"]
    rendered = _run("report", short[1])
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout.splitlines()[0] == str(page_of(three_runs, 1))
    for command in (["diff", short[0], "nosuchrun"], ["diff", "nosuchrun", short[0]], ["report", "nosuchrun"]):
        missing = _run(*command)
        assert missing.returncode == 2 and "no such run: nosuchrun" in missing.stderr, missing.stderr
        assert "has no gold table" not in missing.stderr
    prefix = ids[0].rsplit("-", 1)[0]  # "review-<unique>": the beginning of all three
    for command in (["diff", prefix, ids[1]], ["report", prefix]):
        ambiguous = _run(*command)
        assert ambiguous.returncode == 2, ambiguous.stderr
        assert f"{prefix} names more than one run: {', '.join(ids)}" in ambiguous.stderr
