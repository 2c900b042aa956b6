"""Every way a run can end leaves a true record: a run killed outright is shown `abandoned` by the next
command that reads the runs, with what it wrote listed as unpublished and its lineage closed; a second
run learns at once that the lock is taken."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lib import endings, lineage, registry, runs
from tests.api_server import Scripted
from tests.conftest import ROOT
from tests.e2e.test_faults import (VALID_BODY, alive, children, finish, is_kernel, kill, manifest, start_runner,
                                   wait_until)


def _objects(settings, run_id: str) -> set[str]:
    """The URIs of every object the run's stage records say were written."""
    found = set()
    for stage in registry.NAMES:
        record = runs.read_stage(settings, run_id, stage) or {}
        found |= {a["uri"] for a in record.get("artifacts", []) if str(a.get("uri", "")).startswith("s3://")}
    return found


def _killed_in(settings, stage: str, run_id: str, *args: str) -> int:
    """Start a run, freeze its kernel as `stage` starts, then SIGKILL the runner: nobody is left to say
    how the run ended. Returns the frozen kernel's pid."""
    proc = start_runner("--run-id", run_id, *args)
    path = runs.stage_path(settings, run_id, stage)
    try:
        # Looked at every 10 ms: a 250-record stage runs for well under a second.
        wait_until(lambda: (runs.read_json(path) or {}).get("status") == "running" or proc.poll() is not None,
                   180, f"{stage} starting", interval=0.01)
        assert proc.poll() is None, finish(proc, 5)
        kernels = [pid for pid, cmd in children(proc.pid).items() if is_kernel(cmd)]
        assert len(kernels) == 1, kernels
        os.kill(kernels[0], signal.SIGSTOP)  # the stage stays where it is
        os.killpg(proc.pid, signal.SIGKILL)  # the runner's session: kernels have sessions of their own
        proc.wait(timeout=30)  # not its output: the frozen kernel holds the pipes open
        proc.stdout.close(), proc.stderr.close()
    except BaseException:
        kill(proc)
        raise
    return kernels[0]


@pytest.mark.parametrize("stage", registry.NAMES)
def test_a_run_killed_in_a_stage_is_shown_abandoned_by_the_next_runs(run_pipeline, settings, unique, stage):
    run_id = f"killed{stage[:2]}-{unique}"
    kernel = _killed_in(settings, stage, run_id, "-p", f"table=killed_{unique}")
    assert manifest(settings, run_id)["status"] == "running"  # what the record said until now

    res = run_pipeline("runs", "--json", timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    row = next(r for r in json.loads(res.stdout) if r["run_id"] == run_id)
    assert row["status"] == "abandoned"
    assert row["failed"]["stage"] == stage

    m = manifest(settings, run_id)
    assert m["status"] == "abandoned" and m["ended"]
    assert m["stages"][stage]["status"] == "abandoned"
    assert "ended without a verdict" in m["stages"][stage]["error"]
    # What it wrote is listed as unpublished (a run's objects are published only by its publish).
    assert set(m["unpublished"]) == _objects(settings, run_id) and m["published"] == []
    assert not alive(kernel)  # the frozen kernel was stopped: nothing writes into the record after the verdict
    # Every OpenLineage START has its end; the killed stage's is ABORT.
    events = lineage.read_events(runs.run_dir(settings, run_id))
    started = {e["run"]["runId"]: e["job"]["name"] for e in events if e["eventType"] == "START"}
    ended = {e["run"]["runId"]: e["eventType"] for e in events if e["eventType"] != "START"}
    assert set(started) == set(ended), (started, ended)
    killed = [r for r, job in started.items() if job.endswith(stage)]  # none when killed before its START
    assert [ended[r] for r in killed] in ([], ["ABORT"])
    # Its pages say so, and its reserved space was given back.
    rdir = runs.run_dir(settings, run_id)
    assert "abandoned" in (rdir / "report.html").read_text(encoding="utf-8")
    assert not (rdir / runs.RESERVE_FILE).exists()
    assert not list(rdir.rglob("*.tmp"))
    # Read again, nothing changes: it is marked once.
    assert run_pipeline("runs", "--json").returncode == 0
    assert len(lineage.read_events(rdir)) == len(events)


def test_an_abandoned_run_is_resumed_to_a_complete_record(run_pipeline, settings, unique):
    run_id, table = f"killres-{unique}", f"killres_{unique}"
    kernel = _killed_in(settings, "03_load", run_id, "-p", f"table={table}")
    res = run_pipeline("--resume", run_id, timeout=300)  # the resume itself finds it abandoned, holding the lock
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert not alive(kernel)  # the killed run's kernel was stopped, as the sweep stops those of other runs
    m = manifest(settings, run_id)
    assert m["status"] == "succeeded" and "abandoned" not in m
    attempts = m["stages"]["03_load"]["attempts"]
    assert [a["status"] for a in attempts] == ["abandoned"]
    assert all(m["stages"][s]["status"] == "succeeded" for s in registry.NAMES)
    assert (runs.run_dir(settings, run_id) / "report.html").exists()


def test_a_run_of_another_host_is_abandoned_by_the_next_run_holding_the_lock(run_pipeline, settings, unique):
    """Its processes cannot be looked at from here: `runs` leaves it be, but a run that holds the
    pipeline lock knows no runner can be running it."""
    run_id = f"elsewhere-{unique}"
    _killed_in(settings, "02_clean", run_id, "--stages", "1-2")
    path = runs.manifest_path(settings, run_id)
    data = runs.read_json(path)
    data["process"]["host"] = "another-host.example"
    runs.write_json(path, data)
    assert run_pipeline("runs").returncode == 0
    assert manifest(settings, run_id)["status"] == "running"

    res = run_pipeline("--stages", "1", "--run-id", f"next-{unique}", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    m = manifest(settings, run_id)
    assert m["status"] == "abandoned" and "pipeline lock free" in m["abandoned"]


def _stage_in_a_process_that_dies(settings, run_id: str, stage: str) -> None:
    """A stage begun by a notebook kernel (papermill's or JupyterLab's) that dies before its last cell."""
    code = ("import os, signal\nfrom lib.stages import context\n"
            f"context.begin({stage!r}, {run_id!r})\nos.kill(os.getpid(), signal.SIGKILL)\n")
    env = {k: v for k, v in os.environ.items() if k != runs.RUNNER_ENV}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=120)
    assert (runs.read_stage(settings, run_id, stage) or {}).get("status") == "running"


def test_a_notebook_run_whose_kernel_died_is_abandoned_after_the_documented_quiet_time(run_pipeline, settings,
                                                                                         unique):
    run_id = f"papermill-{unique}"
    stage = registry.first().name
    _stage_in_a_process_that_dies(settings, run_id, stage)
    assert run_pipeline("runs").returncode == 0
    assert manifest(settings, run_id)["status"] == "running"  # its kernel may just be quiet: not yet

    path = runs.stage_path(settings, run_id, stage)
    past = time.time() - endings.ABANDONED_AFTER_S - 5
    os.utime(path, (past, past))
    res = run_pipeline("runs", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert next(r for r in json.loads(res.stdout) if r["run_id"] == run_id)["status"] == "abandoned"
    record = runs.read_stage(settings, run_id, stage)
    assert record["status"] == "abandoned" and "stage's kernel" in record["error"]


def test_a_second_run_learns_the_lock_is_taken_before_any_preflight(run_pipeline, settings, unique, api):
    api.queue(Scripted(200, body=VALID_BODY),  # the first run's preflight probe: quick
              Scripted(200, body=VALID_BODY, delay=30))  # its stage 1: slow, holding the lock
    first = start_runner("--run-id", f"holder-{unique}", "--stages", "1")
    try:
        wait_until(lambda: len(api.requests) >= 2 or first.poll() is not None, 120, "the first run's stage 1")
        asked = len(api.requests)
        api.queue(Scripted(200, body=VALID_BODY, delay=30))  # a preflight probe would wait on this
        started = time.monotonic()
        res = run_pipeline("--run-id", f"second-{unique}", "--stages", "1", timeout=60)
        seconds = time.monotonic() - started
    finally:
        kill(first)
    assert res.returncode == 3, res.stderr[-3000:]
    assert "holds the lock" in res.stderr and "Traceback" not in res.stderr
    assert len(api.requests) == asked  # the second run asked the API nothing
    print(f"the second run exited 3 after {seconds:.2f} s")
    assert seconds < 15, seconds  # a generous bound: it waited on nothing (typically ~1 s)
    assert manifest(settings, f"second-{unique}") is None
