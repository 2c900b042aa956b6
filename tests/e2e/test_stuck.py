"""A way out of every stuck state, through `run_pipeline.py` as a user runs it: configuration errors
exit 2 before anything starts, a log that takes no lines fails the run, and a resume ends the
sessions that a killed run left in the database. (Orphaned stacks: tests/test_stack.py.)"""

from __future__ import annotations

import pytest

from lib import db
from lib import log as logsetup
from tests.e2e.test_faults import all_objects, manifest, run_folders

CONFIG_ERRORS = {
    "api-url-scheme": ([], {"API_BASE_URL": "ftp://127.0.0.1/v3.1/all?fields=name"}, "API_BASE_URL"),
    "api-url-too-many-fields": ([], {"API_BASE_URL": "http://127.0.0.1:9/v3.1/all?fields="
                                     + ",".join(f"f{i}" for i in range(11))}, "API_BASE_URL"),
    "system-schema": (["-p", "db_schema=information_schema"], {}, "system schema"),
    "outputs-not-a-folder": ([], {"PIPELINE_OUTPUTS_DIR": "/dev/null/outputs"},
                             "PIPELINE_OUTPUTS_DIR: /dev/null/outputs is not a usable folder"),
    "logs-not-a-folder": ([], {"PIPELINE_LOGS_DIR": "/dev/null/logs"},
                          "PIPELINE_LOGS_DIR: /dev/null/logs is not a usable folder"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_configuration_errors_exit_2_in_one_line_before_anything_starts(run_pipeline, settings, api, case):
    args, env, message = CONFIG_ERRORS[case]
    before_runs, before_objects = run_folders(settings), all_objects(settings)
    res = run_pipeline(*args, env=env, timeout=120)
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert message in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert api.requests == []  # not even the preflight probe
    assert run_folders(settings) == before_runs and all_objects(settings) == before_objects


def test_stack_commands_refuse_an_unusable_logs_folder_in_one_line(run_pipeline):
    res = run_pipeline("stack", "status", env={"PIPELINE_LOGS_DIR": "/dev/null/logs"})
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "/dev/null/logs cannot be used" in res.stderr


def test_a_log_file_that_takes_no_lines_fails_the_run_loudly(run_pipeline, settings, tmp_path, unique):
    logs = tmp_path / "logs"
    logs.mkdir()
    logsetup.log_file(logs).symlink_to("/dev/full")  # every write: "No space left on device"
    res = run_pipeline("--stages", "1", "--run-id", f"full-{unique}", env={"PIPELINE_LOGS_DIR": str(logs)})
    assert res.returncode == 1, f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert "cannot be written" in res.stderr and "No space left on device" in res.stderr
    assert "Traceback" not in res.stderr
    assert manifest(settings, f"full-{unique}") is None  # nothing ran with its log lost


def test_resume_ends_the_killed_runs_lingering_session_and_says_so(run_pipeline, settings, unique):
    run_id = f"linger-{unique}"
    first = run_pipeline("--stages", "1", "--run-id", run_id, "-p", "min_records=100000")
    assert first.returncode == 1 and manifest(settings, run_id)["status"] == "failed", first.stderr[-2000:]
    # What a kernel killed in the middle of a load leaves behind: its session, idle in a transaction.
    dead = db.connect(settings.db, application_name=f"countries-medallion 03_load {run_id}")
    with dead.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
    try:
        res = run_pipeline("--resume", run_id)
        assert f"ended a lingering session of run {run_id}: server pid {pid} (03_load" in res.stderr, res.stderr
        with pytest.raises(Exception):
            dead.cursor().execute("SELECT 1")
    finally:
        dead.close()
