"""The commands the program prints run as printed: each is copied out of real output and run by a shell
in a scratch copy of the project (tests/scratch.py, with its `.venv`), on the suite's stack. Started
with the project's `.venv/bin/python`, a hint names it so; started by a Python without the project's
packages, `run_pipeline.py` says in one line what to run instead and exits 2."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from lib import contract, source
from tests.api_server import Scripted
from tests.scratch import new_project

VALID_BODY = json.dumps(source.project(json.loads(source.snapshot_bytes()), contract.SOURCE_FIELDS)).encode("utf-8")
HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Down for maintenance</title></head><body></body></html>"


@pytest.fixture
def project(embedded):
    path = new_project()
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


def shell(project, command: str, **env: str) -> subprocess.CompletedProcess:
    """`command` typed into a shell in the project folder (its outputs in the copy, the suite's stack)."""
    return subprocess.run(["bash", "-c", command], cwd=project, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(project),
                                                         "PIPELINE_OUTPUTS_DIR": str(project / "outputs"), **env})


def manifest(project, run_id: str) -> dict:
    return json.loads((project / "outputs" / "runs" / run_id / "manifest.json").read_text(encoding="utf-8"))


def test_the_resume_hint_of_a_failed_run_runs_as_printed(project, api, unique):
    # The preflight's probe gets a good answer, stage 1's request an HTML page: the run fails.
    api.queue(Scripted(200, body=VALID_BODY), Scripted(200, body=HTML_PAGE, headers={"Content-Type": "text/html"}))
    failed = shell(project, f".venv/bin/python run_pipeline.py -p table=hint_{unique}")
    assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-3000:]
    printed = re.search(r"after fixing the cause: +(.+)", failed.stderr).group(1)
    run_id = printed.split()[-1]
    assert printed == f".venv/bin/python run_pipeline.py --resume {run_id}"
    resumed = shell(project, printed)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert manifest(project, run_id)["status"] == "succeeded"


def test_the_hint_of_a_notebook_refused_a_runners_run_runs_as_printed(project, unique):
    run_id = f"hint-{unique}"
    made = shell(project, f".venv/bin/python run_pipeline.py --run-id {run_id} -p table=hint_{unique}")
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]
    refused = shell(project, f".venv/bin/papermill notebooks/03_load.ipynb {project}/03.ipynb -p run_id {run_id}")
    assert refused.returncode == 1 and "RecordClosed" in refused.stderr, refused.stderr[-3000:]
    printed = re.search(r"the earlier attempt is kept\): `([^`]+)`", refused.stderr).group(1)
    # The stage runs again as the run asked for it: on the run's own table.
    assert printed == f".venv/bin/python run_pipeline.py --stages 3 --run-id {run_id} -p table=hint_{unique}"
    again = shell(project, printed)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    stage = manifest(project, run_id)["stages"]["03_load"]
    assert stage["status"] == "succeeded" and len(stage["attempts"]) == 1  # the earlier attempt kept
    assert stage["details"]["table"] == f"hint_{unique}"


def test_a_python_without_the_projects_packages_says_what_to_run_instead(project, tmp_path):
    bare = tmp_path / "bare"  # a virtual environment with nothing installed
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    res = shell(project, f"{bare}/bin/python run_pipeline.py runs")
    assert res.returncode == 2 and res.stdout == "", res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
    assert f"{bare}/bin/python lacks the project's packages (no module named" in res.stderr
    printed = res.stderr.split(" run: ", 1)[1].strip()
    assert printed == ".venv/bin/python run_pipeline.py runs"
    assert shell(project, printed).returncode == 0
    # In a clone without .venv yet, the line says how to make it first.
    (project / ".venv" / "bin").unlink()
    res = shell(project, f"{bare}/bin/python run_pipeline.py --stages 2-4")
    assert res.returncode == 2 and res.stderr.rstrip().endswith(
        "run: make .venv/.installed && .venv/bin/python run_pipeline.py --stages 2-4"), res.stderr
