"""Faults injected for real, through `run_pipeline.py` as a user runs it: the API down, malformed or
slow; the object store stopped; the pipeline lock held; bad input; signals; wrong credentials.

Every test uses its own run ids and tables (the `unique` fixture) and bounded waits."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions
import psycopg2
import pytest

from lib import config, contract, db, db_read, formats, hints, layout, registry, runs, source, stack, stack_state, storage
from tests.api_server import Scripted
from tests.conftest import ROOT

VALID_BODY = json.dumps(source.project(json.loads(source.snapshot_bytes()), contract.SOURCE_FIELDS),
                        ensure_ascii=False).encode("utf-8")


# --- helpers -------------------------------------------------------------------------------------------

def manifest(settings, run_id) -> dict | None:
    return runs.read_json(runs.run_dir(settings, run_id) / "manifest.json")


def bucket_keys(client, bucket: str) -> list[str]:
    """Every key of a bucket; [] when the bucket does not exist (yet)."""
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as err:
        if err.response["Error"]["Code"] in ("404", "NoSuchBucket", "NotFound"):
            return []
        raise
    return [o["key"] for o in storage.list_objects(client, bucket)]


def run_keys(client, bucket: str, run_id: str) -> list[str]:
    return [k for k in bucket_keys(client, bucket) if f"/run_id={run_id}/" in k]


def all_objects(settings) -> set[str]:
    """Every object of every bucket the pipeline writes, local and cloud."""
    s3 = storage.client(settings.store)
    cloud = storage.cloud_client(settings.cloud)
    found = set()
    for client, bucket in ((s3, settings.raw_bucket), (s3, settings.clean_bucket), (s3, settings.gold_bucket),
                           (cloud, settings.cloud.bucket)):
        found |= {f"{bucket}/{k}" for k in bucket_keys(client, bucket)}
    return found


def run_folders(settings) -> set[str]:
    base = runs.runs_dir(settings)
    return {p.name for p in base.iterdir()} if base.is_dir() else set()


def wait_until(check, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} did not happen within {timeout:.0f}s")


def start_runner(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`run_pipeline.py ARGS` in the background, in its own session (as a terminal's Ctrl-C reaches only
    the runner: kernels run in sessions of their own); `env`: variables to set for it."""
    return subprocess.Popen([sys.executable, str(ROOT / "run_pipeline.py"), *args], cwd=ROOT,
                            env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def children(pid: int) -> dict[int, str]:
    """The live child processes of `pid` with their command lines (from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if re.search(rf"^PPid:\s+{pid}$", status, re.M) and "State:\tZ" not in status:
            found[int(entry.name)] = cmdline
    return found


def is_kernel(cmdline: str) -> bool:
    """The runner's kernel (`python -m lib.kernel`, ipykernel less its debugger) or another ipykernel."""
    return "lib.kernel" in cmdline or "ipykernel" in cmdline


def alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def kill(proc: subprocess.Popen) -> tuple[str, str]:
    """End a runner this test started, and its kernels (each in a session of its own)."""
    for pid, cmd in children(proc.pid).items():
        if is_kernel(cmd):
            os.killpg(pid, signal.SIGKILL)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate(timeout=30)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = kill(proc)
        raise AssertionError(f"the runner did not exit within {timeout:.0f}s\n{out[-2000:]}\n{err[-3000:]}")


# --- 1. the API down, fallback off -------------------------------------------------------------------------

def test_api_down_with_fallback_off_fails_preflight_naming_the_api(run_pipeline, settings, s3, unique, api):
    url = "http://127.0.0.1:9/v3.1/all?fields=name,capital"
    assert not stack._port_open(9)  # the discard port: nothing listens there
    run_id = f"apidown-{unique}"
    res = run_pipeline("--run-id", run_id, env={"API_BASE_URL": url, "SNAPSHOT_FALLBACK": "false"}, timeout=120)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Preflight failed" in res.stderr
    assert f"API {url} unreachable" in res.stderr and "Connection refused" in res.stderr
    assert "snapshot fallback is off (SNAPSHOT_FALLBACK=false from the environment)" in res.stderr  # and why
    assert run_keys(s3, settings.raw_bucket, run_id) == []
    assert not runs.run_dir(settings, run_id).exists()  # a new run that never started leaves no record
    assert api.requests == []


def test_api_failing_after_preflight_fails_stage_1_after_bounded_retries(run_pipeline, settings, s3, unique, api):
    run_id = f"api503-{unique}"
    api.queue(Scripted(200, body=VALID_BODY),  # the preflight's probe
              *[Scripted(503, body=b'{"status":503,"message":"Service Unavailable"}')] * 4)
    started = time.monotonic()
    res = run_pipeline("--run-id", run_id, "-p", "max_attempts=3", timeout=180)
    assert res.returncode == 1, res.stderr[-3000:]
    assert time.monotonic() - started < 90
    assert "stage 01_ingest FAILED" in res.stderr
    assert "Unreachable" in res.stderr and "after 3 attempt(s)" in res.stderr and "HTTP 503" in res.stderr
    assert len(api.requests) == 1 + 3
    assert run_keys(s3, settings.raw_bucket, run_id) == []
    m = manifest(settings, run_id)
    assert m["status"] == "failed" and list(m["stages"]) == ["01_ingest"]
    assert m["stages"]["01_ingest"]["status"] == "failed"


# --- 2. malformed payloads served with 200 ------------------------------------------------------------------

MALFORMED = {
    "truncated-json": (VALID_BODY[: len(VALID_BODY) // 2], "not valid JSON"),
    "json-object": (json.dumps({"status": 200, "countries": []}).encode(), "JSON dict, not a list"),
    "html-page": (b"<!DOCTYPE html>\n<html><head><title>Just a moment...</title></head><body>Checking your "
                  b"browser</body></html>", "HTML page, not JSON"),
    "empty-list": (b"[]", "empty list"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_payload_fails_stage_1_and_writes_nothing(run_pipeline, settings, s3, unique, api, kind):
    payload, problem = MALFORMED[kind]
    api.payload = payload
    run_id = f"bad-{kind}-{unique}"
    res = run_pipeline("--run-id", run_id, timeout=180)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "stage 01_ingest FAILED" in res.stderr
    assert "PayloadError" in res.stderr and problem in res.stderr, res.stderr[-3000:]
    assert run_keys(s3, settings.raw_bucket, run_id) == []
    m = manifest(settings, run_id)
    assert m["status"] == "failed"
    assert m["stages"]["01_ingest"]["status"] == "failed" and problem in m["stages"]["01_ingest"]["error"]
    assert set(m["stages"]) == {"01_ingest"}  # later stages never started
    assert f"run {run_id} FAILED" in res.stdout


# --- 3. the API's 400 ---------------------------------------------------------------------------------------

def test_api_url_without_fields_is_refused_at_argument_time(run_pipeline, settings, unique, api):
    run_id = f"nofields-{unique}"
    res = run_pipeline("--run-id", run_id, "-p", f"api_url={api.base}/v3.1/all", timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "must name 1 to 10 fields" in res.stderr and "HTTP 400" in res.stderr
    assert api.requests == []
    assert not runs.run_dir(settings, run_id).exists()


def test_api_400_at_preflight_is_reported_verbatim_before_anything_runs(run_pipeline, settings, s3, unique, api):
    body = json.dumps({"status": 400, "message": f"fields 'capitol' unknown (request {unique})"})
    api.queue(Scripted(400, body=body.encode()))
    run_id = f"api400pre-{unique}"
    res = run_pipeline("--run-id", run_id, "--stages", "1", timeout=180)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Preflight failed" in res.stderr and "HTTP 400" in res.stderr
    assert body in res.stderr, res.stderr[-3000:]
    assert len(api.requests) == 1
    assert not runs.run_dir(settings, run_id).exists()  # a new run that never started leaves nothing
    assert run_keys(s3, settings.raw_bucket, run_id) == []


def test_api_400_in_stage_1_reaches_the_user_verbatim(run_pipeline, settings, s3, unique, api):
    body = json.dumps({"status": 400, "message": f"fields 'capitol' unknown (request {unique})"})
    # The preflight's probe is answered; then the stage's request gets the 400.
    api.queue(Scripted(200, body=VALID_BODY), Scripted(400, body=body.encode()))
    run_id = f"api400-{unique}"
    res = run_pipeline("--run-id", run_id, "--stages", "1", timeout=180)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "HttpError" in res.stderr and "HTTP 400" in res.stderr
    assert body in res.stderr, res.stderr[-3000:]
    assert len(api.requests) == 2  # a 400 is final: never retried
    assert body in manifest(settings, run_id)["stages"]["01_ingest"]["error"]
    assert run_keys(s3, settings.raw_bucket, run_id) == []


# --- 4. the object store stopped between stages -----------------------------------------------------------------

def test_object_store_stopped_after_stage_2_fails_preflight_then_resume_completes(run_pipeline, settings, s3, pg,
                                                                                   unique):
    sdir = Path(os.environ["PIPELINE_STATE_DIR"])
    run_id, table = f"store-{unique}", f"store_{unique}"
    res = run_pipeline("--stages", "1-2", "--run-id", run_id, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    state = stack_state.read_state(sdir)
    # The embedded runner restarts a stopped embedded store by itself, so point it at the same store as a
    # configured endpoint: then nothing restarts it and the preflight has to notice.
    as_configured = {"MINIO_URL": state.s3_url, "MINIO_ACCESS_KEY": state.access_key,
                     "MINIO_SECRET_KEY": state.secret_key}
    try:
        stack.down(sdir, ("object_store",))
        assert stack.status(sdir)["object_store"]["running"] is False
        started = time.monotonic()
        res = run_pipeline("--stages", "3-5", "--run-id", run_id, "-p", f"table={table}", env=as_configured,
                           timeout=120)
        elapsed = time.monotonic() - started
        assert res.returncode == 1, res.stderr[-3000:]
        assert elapsed < 30, f"preflight took {elapsed:.1f}s"
        assert "Preflight failed, nothing was run" in res.stderr
        assert f"object store {state.s3_url}" in res.stderr and "not answering" in res.stderr
        for secret in (state.access_key, state.secret_key, state.db_password):
            assert secret not in res.stdout + res.stderr
        assert f"--resume {run_id}" in res.stderr
        assert not db.table_exists(pg, "public", table)
        # The attempt is recorded in the run's record, so that --resume knows which stages are left.
        m = manifest(settings, run_id)
        assert m["status"] == "failed" and m["requested_stages"] == list(registry.NAMES)
        assert any(state.s3_url in p for p in m["preflight"])
        assert m["parameters"]["03_load"] == {"table": table}
        assert set(m["stages"]) == {"01_ingest", "02_clean"}

        # --resume with the store still down: the same readable refusal, nothing run.
        res = run_pipeline("--resume", run_id, env=as_configured, timeout=120)
        assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
        assert f"object store {state.s3_url}" in res.stderr
        assert set(manifest(settings, run_id)["stages"]) == {"01_ingest", "02_clean"}
    finally:
        stack.up(sdir, ("object_store",))

    res = run_pipeline("--resume", run_id, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"run {run_id} SUCCEEDED" in res.stdout
    m = manifest(settings, run_id)
    assert m["status"] == "succeeded"
    assert m["requested_stages"] == list(registry.NAMES)
    assert all(m["stages"][s]["status"] == "succeeded" for s in registry.NAMES)
    assert m["stages"]["03_load"]["details"]["table"] == table
    assert "preflight" not in m
    assert len(run_keys(s3, settings.raw_bucket, run_id)) == 1
    assert len([k for k in run_keys(s3, settings.clean_bucket, run_id) if layout.is_clean(k)]) == 1
    assert len(db_read.current(pg, "public", table)) == 250
    cloud = storage.cloud_client(settings.cloud)
    exports = run_keys(cloud, settings.cloud.bucket, run_id)
    assert exports == [f"{settings.cloud.prefix}/{table}/run_id={run_id}/{table}.csv"]
    assert len(formats.CSV.decode(storage.get_bytes(cloud, settings.cloud.bucket, exports[0])[0])) == 250
    for secret in (state.access_key, state.secret_key, state.db_password):
        assert secret not in json.dumps(m)


# --- 5. two runs at once ---------------------------------------------------------------------------------------

def test_a_second_run_waits_for_or_refuses_the_pipeline_lock(run_pipeline, settings, s3, unique):
    busy = f"locked-{unique}"
    holder = db.pipeline_lock(settings.db, "holder")
    holder.__enter__()
    try:
        started = time.monotonic()
        res = run_pipeline("--run-id", busy, "--stages", "1", timeout=120)
        assert res.returncode == 3, res.stderr[-3000:]
        assert "countries-medallion run holder" in res.stderr and "--wait-for-lock" in res.stderr
        assert time.monotonic() - started < 60
        assert run_keys(s3, settings.raw_bucket, busy) == []
        assert manifest(settings, busy) is None
    finally:
        holder.__exit__(None, None, None)

    waited = f"waited-{unique}"
    holder = db.pipeline_lock(settings.db, "holder")
    holder.__enter__()
    released = {}

    def release():
        released["at"] = time.time()
        holder.__exit__(None, None, None)

    timer = threading.Timer(2.0, release)
    timer.start()
    try:
        res = run_pipeline("--run-id", waited, "--stages", "1", "--wait-for-lock", "10", timeout=180)
    finally:
        timer.join(timeout=15)
        if "at" not in released:
            release()
    assert res.returncode == 0, res.stderr[-3000:]
    m = manifest(settings, waited)
    assert m["status"] == "succeeded"
    # The run record is opened under the lock: after the holder let go.
    assert datetime.fromisoformat(m["started"]).timestamp() >= released["at"] - 0.05
    assert len(run_keys(s3, settings.raw_bucket, waited)) == 1


# --- 6. bad input: exit 2, nothing runs, nothing is written --------------------------------------------------

BAD_INPUT = {
    "unknown-stage": (["--stages", "7"], {}, "there is no stage 7"),
    "open-range": (["--stages", "2-"], {}, "is not a stage number"),
    "not-a-number": (["--stages", "a"], {}, "is not a stage number"),
    "backwards-range": (["--stages", "4-2"], {}, "runs backwards"),
    "unknown-param": (["-p", "colour=blue"], {}, "no chosen stage has a parameter 'colour'"),
    "wrong-type": (["-p", "min_records=lots"], {}, "expected a value of type int"),
    "run-id-dotdot": (["--run-id", "../x"], {}, "run id '../x' is not allowed"),
    "run-id-space": (["--run-id", "a b"], {}, "is not allowed"),
    "run-id-sql": (["--run-id", "x'; drop table y;--"], {}, "is not allowed"),
    "table-semicolon": (["-p", "table=a;drop"], {}, "table 'a;drop' is not allowed"),
    "table-quote": (["-p", 'table=Robert"'], {}, "is not allowed"),
    "bucket-upper": ([], {"BUCKET_NAME": "Bad_Bucket"}, "bucket name 'Bad_Bucket' is not allowed"),
    "bucket-dotdot": ([], {"BUCKET_NAME": "../x"}, "bucket name '../x' is not allowed"),
    "write-mode": (["-p", "write_mode=sideways"], {}, "write_mode 'sideways' is not one of"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_before_anything_runs(run_pipeline, settings, unique, api, case):
    args, env, message = BAD_INPUT[case]
    before_runs, before_objects = run_folders(settings), all_objects(settings)
    res = run_pipeline(*args, env=env, timeout=120)
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert message in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert api.requests == []  # not even the preflight probe
    assert run_folders(settings) == before_runs
    assert all_objects(settings) == before_objects


# --- 7. interrupted ----------------------------------------------------------------------------------------------

def _start_with_slow_stage_1(api, settings, run_id: str, *args: str) -> subprocess.Popen:
    api.queue(Scripted(200, body=VALID_BODY),  # the preflight's probe: quick
              Scripted(200, body=VALID_BODY, delay=25))  # stage 1's request: slow
    proc = start_runner("--run-id", run_id, *args)
    try:
        wait_until(lambda: len(api.requests) >= 2 or proc.poll() is not None, 120, "stage 1's API request")
        assert proc.poll() is None, "the runner ended before stage 1 asked the API"
        entry = (manifest(settings, run_id) or {}).get("stages", {}).get("01_ingest", {})
        assert entry.get("status") == "running", entry
    except BaseException:
        kill(proc)
        raise
    return proc


def _interrupt(proc, sig) -> tuple[float, str, str]:
    """Send `sig` to the runner; returns how long it took to exit, and its output."""
    try:
        kernels = [pid for pid, cmd in children(proc.pid).items() if is_kernel(cmd)]
        sent = time.monotonic()
        proc.send_signal(sig)
        out, err = finish(proc, 60)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            kill(proc)
    assert proc.returncode == 130, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    assert len(kernels) == 1, kernels
    # The stage's kernel went with it: nothing can write for the interrupted attempt later.
    wait_until(lambda: not alive(kernels[0]), 15, f"the end of kernel {kernels[0]}")
    return seconds, out, err


def test_sigint_during_stage_1_exits_130_and_resume_completes(run_pipeline, settings, s3, pg, unique, api):
    run_id, table = f"sigint-{unique}", f"sigint_{unique}"
    proc = _start_with_slow_stage_1(api, settings, run_id, "-p", f"table={table}")
    seconds, out, err = _interrupt(proc, signal.SIGINT)
    assert f"run {run_id} interrupted (SIGINT) during 01_ingest" in err
    assert seconds < 20  # not after the slow answer came
    assert f"resume with: {hints.command('--resume', run_id)}" in err
    m = manifest(settings, run_id)
    assert m["status"] == "interrupted"
    assert m["stages"]["01_ingest"]["status"] == "interrupted"
    assert set(m["stages"]) == {"01_ingest"}
    assert run_keys(s3, settings.raw_bucket, run_id) == []
    assert (runs.run_dir(settings, run_id) / "01_ingest.ipynb").exists()  # written as the stage started

    res = run_pipeline("--resume", run_id, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    m = manifest(settings, run_id)
    assert m["status"] == "succeeded"
    assert all(m["stages"][s]["status"] == "succeeded" for s in registry.NAMES)
    assert len(m["resumed"]) == 1
    rdir = runs.run_dir(settings, run_id)
    assert (rdir / "01_ingest.ipynb").exists()
    attempts = m["stages"]["01_ingest"]["attempts"]
    assert [(a["notebook"], a["status"]) for a in attempts] == [("01_ingest.attempt1.ipynb", "interrupted")]
    assert (rdir / "01_ingest.attempt1.ipynb").exists()
    assert len(run_keys(s3, settings.raw_bucket, run_id)) == 1
    assert len(db_read.current(pg, "public", table)) == 250


def test_sigterm_during_stage_1_exits_130_marked_interrupted(settings, s3, unique, api, embedded):
    run_id = f"sigterm-{unique}"
    proc = _start_with_slow_stage_1(api, settings, run_id, "--stages", "1")
    _, out, err = _interrupt(proc, signal.SIGTERM)
    assert "interrupted (SIGTERM)" in err
    m = manifest(settings, run_id)
    assert m["status"] == "interrupted" and m["stages"]["01_ingest"]["status"] == "interrupted"
    assert run_keys(s3, settings.raw_bucket, run_id) == []


# --- 8. a cell running past --cell-timeout ------------------------------------------------------------------

def test_cell_timeout_fails_stage_1_in_bounded_time(run_pipeline, settings, s3, unique, api):
    api.queue(Scripted(200, body=VALID_BODY), Scripted(200, body=VALID_BODY, delay=8))
    run_id = f"timeout-{unique}"
    started = time.monotonic()
    res = run_pipeline("--run-id", run_id, "--stages", "1", "--cell-timeout", "3", "-p", "read_timeout=30",
                       timeout=120)
    elapsed = time.monotonic() - started
    assert res.returncode == 1, res.stderr[-3000:]
    assert elapsed < 40, f"took {elapsed:.1f}s"
    assert "stage 01_ingest FAILED" in res.stderr
    assert re.search(r"time(d)? ?out", res.stderr, re.I), res.stderr[-3000:]
    m = manifest(settings, run_id)
    assert m["status"] == "failed" and m["stages"]["01_ingest"]["status"] == "failed"
    assert re.search(r"time(d)? ?out", m["stages"]["01_ingest"]["error"], re.I)
    assert run_keys(s3, settings.raw_bucket, run_id) == []


# --- 9. wrong credentials are refused --------------------------------------------------------------------------

def _s3_with(settings, access_key: str, secret_key: str):
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.store.url, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=botocore.config.Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                      retries={"max_attempts": 1}))


def test_embedded_s3_refuses_wrong_credentials(settings, s3, unique):
    bucket = f"creds-{unique}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    access, secret = settings.store.access_key.reveal(), settings.store.secret_key.reveal()
    for label, client in (("wrong secret", _s3_with(settings, access, secret + "wrong")),
                          ("unknown key", _s3_with(settings, f"nobody-{unique}", secret)),
                          ("anonymous", boto3.session.Session().client(
                              "s3", endpoint_url=settings.store.url, region_name="us-east-1",
                              config=botocore.config.Config(signature_version=botocore.UNSIGNED,
                                                            retries={"max_attempts": 1})))):
        for call in (lambda c: c.list_buckets(),
                     lambda c: c.get_object(Bucket=bucket, Key="k"),
                     lambda c: c.put_object(Bucket=bucket, Key="intruder", Body=b"y")):
            with pytest.raises(botocore.exceptions.ClientError) as info:
                call(client)
            assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403, label
    assert bucket_keys(s3, bucket) == ["k"]
    s3.delete_object(Bucket=bucket, Key="k")
    s3.delete_bucket(Bucket=bucket)


def test_embedded_postgres_refuses_a_wrong_password(settings):
    args = db.connect_args(settings.db)
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(**{**args, "password": args["password"] + "x"})
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(**{**args, "password": ""})
    wrong = config.Database(**{**settings.db.__dict__, "password": config.Secret("not-the-password")})
    started = time.monotonic()
    with pytest.raises(db.DatabaseError, match="password authentication failed") as info:
        db.connect(wrong)
    assert time.monotonic() - started < 10  # refused at once, not retried
    assert "not-the-password" not in str(info.value) and ":***@" in str(info.value)
    psycopg2.connect(**args).close()  # the right one still works
