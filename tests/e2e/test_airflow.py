"""The Airflow DAG (airflow/countries_medallion.py) run by Airflow 3 itself, with `airflow dags test`,
against the suite's embedded stack and local API server.

Airflow lives in its own virtual environment, .venv-airflow/ (`make airflow-venv`, a dependency of
`make test`), with a throw-away AIRFLOW_HOME and SQLite metadata database per module. The DAG's tasks
run the stages with this suite's Python (the project's venv) and inherit the suite's environment, so
every run lands in the session's stack and outputs folder and is read back like any other run.

`airflow dags test` runs the tasks one by one in its own process and does honour retries: a failed task
with retries left goes to up_for_retry, and the loop runs it again once its retry delay has passed
(MEDALLION_RETRY_DELAY=1 here), as the next try number.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lib import contract, db_read, hints, names, registry, runs, source
from tests.api_server import Scripted
from tests.conftest import ROOT

AIRFLOW = ROOT / ".venv-airflow" / "bin" / "airflow"
DAG_ID = "countries_medallion"
VALID_BODY = json.dumps(source.project(json.loads(source.snapshot_bytes()), contract.SOURCE_FIELDS)).encode("utf-8")
HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Down for maintenance</title></head><body></body></html>"


@pytest.fixture(scope="module")
def airflow(embedded):
    """`airflow ARGS...` in Airflow's venv, with a migrated metadata database; returns the runner and
    the metadata database's path."""
    assert AIRFLOW.exists(), f"{AIRFLOW} is missing: run `make airflow-venv` (`make test` does it first)"
    home = Path(tempfile.mkdtemp(prefix="medallion-airflow-"))
    env = {
        **os.environ,  # the suite's pipeline environment: its stack, API server and folders
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "MEDALLION_HOME": str(ROOT),
        "MEDALLION_PYTHON": sys.executable,
        "MEDALLION_RETRY_DELAY": "1",
    }

    def run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([str(AIRFLOW), *args], cwd=home, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    try:
        res = run("db", "migrate", timeout=300)
        assert res.returncode == 0, res.stdout[-3000:]
        yield run, home / "airflow.db"
    finally:
        shutil.rmtree(home, ignore_errors=True)


def dag_test(airflow, logical_date: str, conf: dict) -> tuple[subprocess.CompletedProcess, str, str]:
    """Run the DAG once; returns the result, the pipeline run id its tasks used and Airflow's run id."""
    run, _ = airflow
    res = run("dags", "test", DAG_ID, logical_date, "-c", json.dumps(conf))
    found = set(re.findall(r"stage 01_ingest of pipeline run (\S+) \(Airflow run (\S+), try", res.stdout))
    assert len(found) == 1, res.stdout[-5000:]
    run_id, dag_run_id = found.pop()
    return res, run_id, dag_run_id


def task_tries(database: Path, dag_run_id: str) -> dict[str, tuple[str, int]]:
    """{task id: (state, try number)} of a DAG run, read from Airflow's metadata database."""
    with sqlite3.connect(database) as conn:
        rows = conn.execute("SELECT task_id, state, try_number FROM task_instance WHERE dag_id = ? AND run_id = ?",
                            (DAG_ID, dag_run_id)).fetchall()
    return {task: (state, tries) for task, state, tries in rows}


def assert_complete_record(settings, run_id: str) -> dict:
    """Five executed notebooks, every stage succeeded, reconciliation passed."""
    run_dir = runs.run_dir(settings, run_id)
    m = runs.read_json(run_dir / "manifest.json")
    assert m is not None, f"no run record at {run_dir}"
    assert m["status"] == "succeeded"
    assert m["requested_stages"] == list(registry.NAMES)
    for stage in registry.NAMES:
        assert m["stages"][stage]["status"] == "succeeded", stage
        assert m["stages"][stage]["rows_out"] == 250, stage
        assert (run_dir / f"{stage}.ipynb").is_file(), stage
    assert m["reconciliation"], "no reconciliation in the manifest"
    assert [r["status"] for r in m["reconciliation"]].count("MISMATCH") == 0, m["reconciliation"]
    return m


def test_the_dag_lists_the_runners_stages_in_order(airflow):
    run, _ = airflow
    res = run("tasks", "list", DAG_ID)
    assert res.returncode == 0, res.stdout[-3000:]
    assert [line for line in res.stdout.split() if re.fullmatch(r"\d\d_\w+", line)] == list(registry.NAMES)
    res = run("dags", "list-import-errors")
    assert res.returncode == 0 and "No data found" in res.stdout, res.stdout[-3000:]


def test_dag_run_is_one_pipeline_run_of_five_stages(airflow, settings, pg, unique):
    table = f"airflow_{unique}"
    res, run_id, dag_run_id = dag_test(airflow, "2026-01-15", {"pipeline_params": {"table": table}})
    assert res.returncode == 0, res.stdout[-5000:]
    names.run_id(run_id)
    assert re.fullmatch(r"manual-20260115T000000Z-[0-9a-f]{8}", run_id), run_id

    m = assert_complete_record(settings, run_id)
    assert m["parameters"]["03_load"] == {"table": table}
    assert m["parameters"]["01_ingest"] == {}  # each stage got only the parameters its notebook declares
    assert len(db_read.current(pg, "public", table)) == 250

    # Each task's log holds its runner command, the executed notebook's path and the stage summary.
    run_dir = runs.run_dir(settings, run_id)
    for n, stage in enumerate(registry.NAMES, start=1):
        assert f"$ {hints.command('--stages', str(n), '--run-id', run_id)}" in res.stdout, stage
        assert f"stage {stage}: running {run_dir / (stage + '.ipynb')}" in res.stdout, stage
        assert re.search(rf"  {stage}\s+succeeded\s+[\d.]+s  rows 250 → 250", res.stdout), stage
    assert res.stdout.count(f"run {run_id} SUCCEEDED") == 5

    # Airflow's own record: five successful task instances, each at its first try.
    assert task_tries(airflow[1], dag_run_id) == {stage: ("success", 1) for stage in registry.NAMES}


def test_a_failed_task_retried_by_airflow_resumes_its_stage_and_completes_the_run(airflow, settings, unique, api):
    # The preflight's probe gets a good answer, stage 1's request an HTML page: the first try of
    # 01_ingest fails. The API then answers normally again, so the retry can succeed.
    api.queue(Scripted(200, body=VALID_BODY), Scripted(200, body=HTML_PAGE, headers={"Content-Type": "text/html"}))
    table = f"airflow_retry_{unique}"
    res, run_id, dag_run_id = dag_test(airflow, "2026-01-16", {"pipeline_params": {"table": table}})
    assert res.returncode == 0, res.stdout[-5000:]

    m = assert_complete_record(settings, run_id)
    ingest = m["stages"]["01_ingest"]
    assert [a["status"] for a in ingest["attempts"]] == ["failed"]
    assert "HTML page" in ingest["attempts"][0]["error"]
    assert (runs.run_dir(settings, run_id) / "01_ingest.attempt1.ipynb").is_file()
    assert all(not m["stages"][s]["attempts"] for s in registry.NAMES[1:])
    assert m["parameters"]["03_load"] == {"table": table}  # the resume kept the run's parameters

    # Try 1 ran the stage and failed; try 2 was a resume of the same pipeline run.
    assert f"try 1: running 01_ingest of run {run_id}" in res.stdout
    assert "stage 01_ingest FAILED" in res.stdout
    assert f"try 2: the run record shows 01_ingest failed → resuming run {run_id}" in res.stdout
    assert f"$ {hints.command('--resume', run_id)}" in res.stdout
    assert task_tries(airflow[1], dag_run_id) == {"01_ingest": ("success", 2),
                                                   **{stage: ("success", 1) for stage in registry.NAMES[1:]}}


def test_a_parameter_no_stage_declares_is_refused_when_the_dag_is_triggered(airflow, settings):
    """The DAG's params are the stages' declarations (airflow/pipeline_params.schema.json): a key no
    stage declares, or a value of the wrong type, is refused before any task runs."""
    run, _ = airflow
    for conf, problem in (({"no_such_parameter": 1}, "'no_such_parameter' was unexpected"),
                          ({"min_records": "many"}, "'many' is not of type 'integer'")):
        res = run("dags", "test", DAG_ID, "2026-01-17", "-c", json.dumps({"pipeline_params": conf}))
        assert res.returncode != 0 and "Invalid input for param pipeline_params" in res.stdout, res.stdout[-3000:]
        assert problem in res.stdout
        assert "stage 01_ingest of pipeline run" not in res.stdout  # no task ran
