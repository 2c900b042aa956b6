"""One run, two workers: two checkouts of the project, each with its own `outputs/` as two machines
would have, share the suite's services through `.env` (the lines `run_pipeline.py stack env` prints,
and a records bucket of this module's own). Stages 1–2 of a run go in one, 3–5 in the other, and both
show the same complete record, read from the records bucket (lib/record_store.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from lib import layout, publish, registry, runs, storage
from tests.api_server import Scripted
from tests.conftest import ROOT, SERVICE_VARS
from tests.e2e.test_airflow import HTML_PAGE
from tests.e2e.test_faults import VALID_BODY, children, is_kernel, wait_until
from tests.scratch import new_project

OWN_FOLDERS = ("PIPELINE_ENV_FILE", "PIPELINE_STATE_DIR", "PIPELINE_OUTPUTS_DIR", "PIPELINE_LOGS_DIR")


@pytest.fixture(scope="module")
def records_bucket() -> str:
    return f"records-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def workers(embedded, records_bucket):
    """Two checkouts whose `.env` names the suite's stack, as a user sets up a second worker."""
    shown = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "run_pipeline.py"), "stack", "env"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    lines = [line.removeprefix("export ") for line in shown.stdout.splitlines() if line.startswith("export ")]
    assert any(line.startswith("MINIO_URL=") for line in lines) and any(line.startswith("DB_HOST=") for line in lines)
    projects = [new_project(), new_project()]
    for project in projects:
        (project / ".env").write_text("\n".join([*lines, f"RECORDS_BUCKET={records_bucket}", ""]))
    yield projects
    for project in projects:
        shutil.rmtree(project.parent, ignore_errors=True)


def environment() -> dict[str, str]:
    """The suite's environment (its API server) without what would point a checkout elsewhere than
    its own `.env` and folders."""
    return {k: v for k, v in os.environ.items() if k not in OWN_FOLDERS and k not in SERVICE_VARS}


def command(project: Path, *args: str) -> list[str]:
    return [str(project / ".venv" / "bin" / "python"), str(project / "run_pipeline.py"), *args]


def run_in(project: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command(project, *args), cwd=project, env=environment(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def manifest(project: Path, run_id: str) -> dict | None:
    return runs.read_json(runs.manifest_path(project / "outputs", run_id))


def row(project: Path, run_id: str) -> dict:
    return next(r for r in json.loads(ok(run_in(project, "runs", "--json")).stdout) if r["run_id"] == run_id)


def test_one_run_across_two_checkouts_keeps_one_complete_record(workers, settings):
    first, second = workers
    run_id = runs.new_run_id()
    table = f"workers_{run_id[-6:]}"
    ok(run_in(first, "--stages", "1-2", "--run-id", run_id))
    assert manifest(second, run_id) is None  # nothing of it on the second worker's disk

    res = ok(run_in(second, "--stages", "3-5", "--run-id", run_id, "-p", f"table={table}"))
    assert f"run {run_id} SUCCEEDED" in res.stdout
    m = manifest(second, run_id)
    assert m["requested_stages"] == list(registry.NAMES)
    assert {s: e["status"] for s, e in m["stages"].items()} == {s: "succeeded" for s in registry.NAMES}
    assert m["parameters"]["05_gold"]["table"] == table
    assert all(r["status"] != "MISMATCH" for r in m["reconciliation"]) and m["published"]
    assert publish.latest_published(settings, table) == run_id

    # Both checkouts show the same record, with its pages, whichever ran what.
    assert row(first, run_id) == row(second, run_id)
    index = (first / "outputs" / "index.html").read_text()  # written again by `runs` once it pulled the run
    assert run_id in index and f"runs/{run_id}/05_gold.html" in index
    assert row(first, run_id)["status"] == "succeeded"
    assert manifest(first, run_id) == manifest(second, run_id)
    for project in workers:
        ok(run_in(project, "report", run_id))
        run_dir = runs.run_dir(project / "outputs", run_id)
        report = (run_dir / "report.html").read_text()
        assert all(stage in report for stage in registry.NAMES)
        assert all((run_dir / f"{stage}.html").is_file() and (run_dir / f"{stage}.ipynb").is_file()
                   for stage in registry.NAMES)
        assert f"runs/{run_id}" in (project / "outputs" / "index.html").read_text()

    # A checkout's outputs/ is only a copy: lost, it comes back from the records bucket.
    shutil.rmtree(first / "outputs" / "runs")
    assert row(first, run_id) == row(second, run_id)
    assert manifest(first, run_id) == manifest(second, run_id)
    assert (runs.run_dir(first / "outputs", run_id) / "05_gold.html").is_file()


def test_a_tampered_input_is_refused_on_the_other_worker(workers, settings, s3):
    first, second = workers
    run_id = runs.new_run_id()
    table = f"tampered_{run_id[-6:]}"
    ok(run_in(first, "--stages", "1-2", "--run-id", run_id))
    record = runs.read_stage(first / "outputs", run_id, "02_clean")
    clean = next(a for a in record["artifacts"] if layout.is_clean(a["key"]))
    data, meta = storage.get_bytes(s3, clean["bucket"], clean["key"])
    # Rewritten with its metadata kept: only the stage-2 record, read from the store, can tell.
    s3.put_object(Bucket=clean["bucket"], Key=clean["key"], Body=data + b"\0", Metadata=meta)

    res = run_in(second, "--stages", "3-5", "--run-id", run_id, "-p", f"table={table}")
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "FAILED" in res.stdout + res.stderr
    failed = manifest(second, run_id)["stages"]["03_load"]
    assert failed["status"] == "failed" and "checksum mismatch" in failed["error"], failed
    assert publish.latest_published(settings, table) is None  # nothing of the run was published
    assert row(first, run_id) == row(second, run_id)
    assert row(first, run_id)["status"] == "failed"


def test_a_run_in_one_checkout_while_the_other_holds_the_lock_exits_3(workers, api):
    first, second = workers
    api.queue(Scripted(200, body=VALID_BODY),  # the holder's preflight probe: quick
              Scripted(200, body=VALID_BODY, delay=30))  # its stage 1: slow, holding the lock
    holder = subprocess.Popen(command(first, "--stages", "1", "--run-id", runs.new_run_id()), cwd=first,
                              env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: len(api.requests) >= 2 or holder.poll() is not None, 120, "the holder's stage 1")
        assert holder.poll() is None, holder.communicate()
        second_run = runs.new_run_id()
        started = time.monotonic()
        res = run_in(second, "--stages", "1", "--run-id", second_run, timeout=120)
        seconds = time.monotonic() - started
    finally:
        for pid, cmd in children(holder.pid).items():
            if is_kernel(cmd):
                os.killpg(pid, signal.SIGKILL)
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
        holder.communicate(timeout=30)
    assert res.returncode == 3, res.stdout[-3000:] + res.stderr[-3000:]
    assert "holds the lock" in res.stderr and "Traceback" not in res.stderr
    assert manifest(second, second_run) is None
    print(f"the second checkout's run exited 3 after {seconds:.2f} s")


POLICY = '''"""The test's cluster policy: odd stages run in the first checkout, even ones in the second, as
tasks of one DAG run would land on two workers."""

HOMES = {homes!r}


def task_policy(task):
    if getattr(task, "stage", None):
        task.home = HOMES[(int(task.stage[:2]) - 1) % 2]
'''


def test_a_dag_run_whose_tasks_alternate_between_two_checkouts_keeps_one_record(workers, settings, tmp_path):
    """`airflow dags test` with each task's MEDALLION_HOME the other checkout than the task before."""
    from tests.e2e.test_airflow import AIRFLOW, DAG_ID

    first, second = workers
    home = tmp_path / "airflow"
    (home / "config").mkdir(parents=True)
    (home / "config" / "airflow_local_settings.py").write_text(POLICY.format(homes=[str(first), str(second)]))
    env = {**environment(), "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "airflow"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "MEDALLION_HOME": str(first), "MEDALLION_RETRY_DELAY": "1"}

    def airflow(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(AIRFLOW), *args], cwd=home, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=900, stdin=subprocess.DEVNULL)

    assert airflow("db", "migrate").returncode == 0
    table = f"alternating_{uuid.uuid4().hex[:8]}"
    res = airflow("dags", "test", DAG_ID, "2026-02-01", "-c", json.dumps({"pipeline_params": {"table": table}}))
    assert res.returncode == 0, res.stdout[-5000:]
    ran = dict(re.findall(r"stage (\d\d_\w+) of pipeline run \S+ \(Airflow run \S+, try \d+\) in (\S+)", res.stdout))
    assert ran == {stage: str(workers[n % 2]) for n, stage in enumerate(registry.NAMES)}, ran
    (run_id,) = set(re.findall(r"stage \d\d_\w+ of pipeline run (\S+) \(Airflow run", res.stdout))

    assert row(first, run_id) == row(second, run_id)
    m = manifest(first, run_id)
    assert m == manifest(second, run_id) and m["status"] == "succeeded"
    assert {s: e["status"] for s, e in m["stages"].items()} == {s: "succeeded" for s in registry.NAMES}
    assert publish.latest_published(settings, table) == run_id
    for project in workers:  # every stage's executed notebook, wherever it ran
        assert all((runs.run_dir(project / "outputs", run_id) / f"{s}.ipynb").is_file() for s in registry.NAMES)


def test_a_run_that_failed_in_one_checkout_resumes_in_the_other(workers, settings, s3, api, records_bucket):
    first, second = workers
    run_id = runs.new_run_id()
    # The preflight's probe gets a good answer, stage 1's request an HTML page: stage 1 fails in the first.
    api.queue(Scripted(200, body=VALID_BODY), Scripted(200, body=HTML_PAGE, headers={"Content-Type": "text/html"}))
    res = run_in(first, "--run-id", run_id, "-p", f"table=resumed_{run_id[-6:]}")
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]

    res = ok(run_in(second, "--resume", run_id))
    assert f"run {run_id} SUCCEEDED" in res.stdout
    m = manifest(second, run_id)
    assert {s: e["status"] for s, e in m["stages"].items()} == {s: "succeeded" for s in registry.NAMES}
    assert [a["status"] for a in m["stages"]["01_ingest"]["attempts"]] == ["failed"]
    assert m["parameters"]["03_load"]["table"] == f"resumed_{run_id[-6:]}"  # the run's own parameters
    kept = {o["key"] for o in storage.list_objects(s3, records_bucket, f"runs/{run_id}/stages/")}
    assert {f"runs/{run_id}/stages/01_ingest.attempt1.json", f"runs/{run_id}/stages/01_ingest.attempt2.json"} <= kept
    assert row(first, run_id) == row(second, run_id)
    assert (runs.run_dir(first / "outputs", run_id) / "01_ingest.attempt1.ipynb").is_file()


def test_a_notebook_in_one_checkout_reads_a_run_recorded_in_the_other(workers, records_bucket, s3):
    """Plain papermill in the second checkout, `input_run` a run whose stages 1-2 ran in the first: it
    proves the silver objects against the first checkout's records, and its own run is stored too."""
    first, second = workers
    run_id = runs.new_run_id()
    ok(run_in(first, "--stages", "1-2", "--run-id", run_id))
    out = second / "out.ipynb"
    done = subprocess.run([str(second / ".venv" / "bin" / "papermill"), "notebooks/03_load.ipynb", str(out),
                           "-p", "input_run", run_id, "-p", "table", f"nb_{run_id[-6:]}"], cwd=second,
                          env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (mine,) = [p.name for p in (second / "outputs" / "runs").iterdir() if p.name.startswith("papermill-")]
    m = manifest(second, mine)
    assert m["based_on"] == run_id and m["stages"]["03_load"]["status"] == "succeeded"
    assert row(first, mine) == row(second, mine)  # the notebook's own run, seen from the first checkout
