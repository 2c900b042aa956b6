"""No credential ever lands in a run record, an executed notebook or a log.

A second embedded stack is started in a fresh state folder whose credentials are sentinel values; the
cloud role gets the same keys explicitly, as AWS-style variables. After a full run, failing runs and the
stack commands that do not print credentials (everything but `stack env`), every byte under that
stack's outputs and logs folders is searched for every sentinel."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from lib import lineage, runs, stack, stack_state, storage
from lib.config import Cloud, Secret
from tests.conftest import SECRETS_PORT_BASE
from tests.api_server import Scripted
from tests.sinks import HttpSink, closed_port


def write_private(path: Path, data: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)


@pytest.fixture
def sentinel_stack(tmp_path):
    """A second, private embedded stack whose credentials are sentinels; stopped at the end."""
    tag = uuid.uuid4().hex
    sentinels = {
        "access_key": f"SENTINELAK{tag[:12]}",
        "secret_key": f"SENTINELSK{tag}",
        "db_password": f"SENTINELPW{tag[::-1]}",
    }
    dirs = {name: tmp_path / name for name in ("state", "outputs", "logs")}
    dirs["state"].mkdir(mode=0o700)
    write_private(dirs["state"] / "credentials.json", sentinels)
    write_private(dirs["state"] / "stack.json", {"port_base": SECRETS_PORT_BASE, "db_user": "medallion",
                                                  "db_name": "countries"})
    state = stack_state.read_state(dirs["state"])
    assert (state.access_key, state.secret_key, state.db_password) == tuple(sentinels.values())
    env = {
        "PIPELINE_STATE_DIR": str(dirs["state"]),
        "PIPELINE_OUTPUTS_DIR": str(dirs["outputs"]),
        "PIPELINE_LOGS_DIR": str(dirs["logs"]),
        "PIPELINE_STACK_PORT_BASE": str(SECRETS_PORT_BASE),
        # The cloud role: an S3-compatible endpoint (this stack's) with explicit AWS-style keys.
        "S3_BUCKET_NAME": "sentinel-cloud",
        "AWS_ENDPOINT_URL": state.s3_url,
        "AWS_ACCESS_KEY_ID": sentinels["access_key"],
        "AWS_SECRET_ACCESS_KEY": sentinels["secret_key"],
    }
    try:
        yield state, sentinels, dirs, env
    finally:
        stack.down(dirs["state"])
        assert stack.status(dirs["state"])["object_store"]["running"] is False


@pytest.fixture
def webhook():
    sink = HttpSink()
    yield sink
    sink.close()



def recording(run_pipeline, env: dict, outputs: list):
    """`run(*args, extra=None, expect=N)`: run_pipeline.py with `env` (and `extra`), its exit code
    checked and its output kept in `outputs` for the scan."""
    def run(*args, extra=None, expect):
        res = run_pipeline(*args, env={**env, **(extra or {})}, timeout=300)
        outputs.append(res)
        assert res.returncode == expect, f"{args}: exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        return res

    return run

def test_no_sentinel_credential_in_outputs_or_logs(run_pipeline, sentinel_stack, unique, webhook):
    state, sentinels, dirs, env = sentinel_stack
    # Alerts (failed runs) go to a real local webhook; its URL carries a sentinel token too.
    token = f"SENTINELTK{uuid.uuid4().hex}"
    scanned = {**sentinels, "alert_token": token}
    env = {**env, "ALERT_URLS": f"json://alerts:{token}@127.0.0.1:{webhook.port}/"}
    table = f"secrets_{unique}"
    ok, failing, resumed = f"sec-{unique}-ok", f"sec-{unique}-bad", f"sec-{unique}-cred"
    outputs = []
    run = recording(run_pipeline, env, outputs)

    run("stack", "up", expect=0)
    assert json.loads(run("stack", "status", expect=0).stdout)["object_store"]["running"] is True

    # A whole run on the sentinel stack.
    res = run("--run-id", ok, "-p", f"table={table}", "--html", expect=0)
    assert (dirs["outputs"] / "runs" / ok / "05_gold.html").exists()  # the HTML pages are scanned too
    settings_dir = dirs["outputs"] / "runs" / ok
    m = json.loads((settings_dir / "manifest.json").read_text())
    assert m["status"] == "succeeded" and m["stages"]["04_export"]["rows_out"] == 250
    assert m["stack"]["cloud"]["bucket"] == "sentinel-cloud" and m["stack"]["cloud"]["endpoint"] == state.s3_url
    cloud = storage.cloud_client(Cloud("sentinel-cloud", "exports", "us-east-1", None, state.s3_url, True,
                                       Secret(sentinels["access_key"]), Secret(sentinels["secret_key"])))
    export = m["stages"]["04_export"]["objects"][0]
    assert export["bucket"] == "sentinel-cloud" and storage.head(cloud, export["bucket"], export["key"])

    # A stage failing: stage 4 of a new run (reading run ok's data) on a table that does not exist.
    res = run("--stages", "4", "--run-id", failing, "-p", f"table=missing_{unique}", "-p", f"input_run={ok}", expect=1)
    assert "stage 04_export FAILED" in res.stderr and "does not exist" in res.stderr

    # The cloud role with a wrong secret (the sentinel plus a suffix): the preflight meets the store's 403.
    res = run("--stages", "4", "--run-id", f"{failing}-2", "-p", f"table={table}",
              extra={"AWS_SECRET_ACCESS_KEY": sentinels["secret_key"] + "wrong"}, expect=1)
    assert "Preflight failed" in res.stderr and "bucket 'sentinel-cloud': 403" in res.stderr
    # ... and with an unknown access key (the sentinel plus a suffix).
    res = run("--stages", "4", "--run-id", f"{failing}-3", "-p", f"table={table}",
              extra={"AWS_ACCESS_KEY_ID": sentinels["access_key"] + "X"}, expect=1)
    assert "Preflight failed" in res.stderr and "bucket 'sentinel-cloud': 403" in res.stderr

    # The database as a configured server with a wrong password: the preflight refuses an existing run.
    run("--stages", "1-2", "--run-id", resumed, expect=0)
    res = run("--stages", "3", "--run-id", resumed, "-p", f"table={table}", expect=1, extra={
        "DB_HOST": "127.0.0.1", "DB_PORT": str(state.pg_port), "DB_USER": state.db_user,
        "DB_NAME": state.db_name, "DB_PASSWORD": sentinels["db_password"] + "wrong"})
    assert "password authentication failed" in res.stderr and ":***@" in res.stderr
    # ... then resumed on the embedded settings.
    run("--resume", resumed, expect=0)

    run("stack", "down", expect=0)
    assert json.loads(run("stack", "status", expect=0).stdout)["object_store"]["running"] is False

    # Everything written under outputs/ and logs/, byte for byte, and everything printed.
    files = [p for d in (dirs["outputs"], dirs["logs"]) for p in d.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"manifest.json", "01_ingest.ipynb", "04_export.ipynb", "05_gold.ipynb"} <= names
    assert any(p.suffix == ".log" and p.stat().st_size > 0 for p in files)
    assert len([p for p in files if p.parent.name == "stages"]) >= 5
    hits = [(str(p), label) for p in files for label, value in scanned.items()
            if value.encode() in p.read_bytes()]
    assert hits == []
    # The search itself finds them where they belong: the stack's private credentials file.
    creds = (dirs["state"] / "credentials.json").read_bytes()
    assert all(value.encode() in creds for value in sentinels.values())
    printed = [(" ".join(r.args[2:]), label) for r in outputs for label, value in scanned.items()
               if value in r.stdout or value in r.stderr]
    assert printed == []
    # Every failed run was alerted, in a stage or by its preflight (those with a wrong credential), and
    # no alert carried a credential.
    assert [p["json"]["title"] for p in webhook.posts] == [
        f"countries-medallion: run {r} FAILED" for r in (failing, f"{failing}-2", f"{failing}-3", resumed)]
    alerted = [(p["json"]["title"], label) for p in webhook.posts for label, value in scanned.items()
               if value.encode() in p["body"]]
    assert alerted == []
    assert runs.read_json(dirs["outputs"] / "runs" / resumed / "manifest.json")["status"] == "succeeded"


# --- credentials in the API URL ------------------------------------------------------------------------

def every_object_metadata(settings) -> dict[str, dict]:
    """s3://bucket/key → metadata of every object in every bucket of the store (the cloud role's
    bucket lives there too on the embedded stack)."""
    s3 = storage.client(settings.store)
    found = {}
    for bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        for obj in storage.list_objects(s3, bucket):
            found[f"s3://{bucket}/{obj['key']}"] = storage.head(s3, bucket, obj["key"])["metadata"]
    return found


def test_credentials_in_the_api_url_are_masked_everywhere(run_pipeline, settings, api, unique, webhook):
    """API_BASE_URL carries a password (userinfo) and an API key (a query parameter): the requests use
    them, yet no file under outputs and logs, no object's metadata, no lineage event sent, no alert and
    nothing printed holds either, whether the run succeeds, its preflight fails, its stage 1 fails or it
    falls back to the snapshot."""
    password, key = f"SENTINELAPW{uuid.uuid4().hex}", f"SENTINELKEY{uuid.uuid4().hex}"
    scanned = {"password": password, "apikey": key}
    url = api.url.replace("://", f"://reader:{password}@") + f"&apikey={key}"
    masked = api.url.replace("://", "://***@") + "&apikey=***"
    marquez = HttpSink(status=201)
    env = {"API_BASE_URL": url, "OPENLINEAGE_URL": f"http://127.0.0.1:{marquez.port}",
           "ALERT_URLS": f"json://127.0.0.1:{webhook.port}/"}
    table, ok, bad, cut = f"apikey_{unique}", f"key-{unique}-ok", f"key-{unique}-bad", f"key-{unique}-cut"
    outputs = []
    run = recording(run_pipeline, env, outputs)

    try:
        # A whole run: the API is asked with the credentials, the record shows the URL masked.
        run("--run-id", ok, "-p", f"table={table}", "--html", expect=0)
        assert any(key in r["path"] for r in api.requests)
        m = runs.read_json(runs.manifest_path(settings, ok))
        assert m["stack"]["api_url"] == masked
        ingest = m["stages"]["01_ingest"]
        assert ingest["details"]["url"] == masked and ingest["objects"][0]["inputs"] == [masked]
        raw = ingest["objects"][0]
        assert every_object_metadata(settings)[f"s3://{raw['bucket']}/{raw['key']}"]["source-url"] == masked
        events = lineage.read_events(runs.run_dir(settings, ok))
        api_inputs = [i for e in events for i in e["inputs"] if i["namespace"].startswith("http")]
        assert {(i["namespace"], i["name"]) for i in api_inputs} == {(api.base, "/v3.1/all")}

        # The API refuses the preflight's request, echoing the key in its answer: nothing is run.
        run("--stages", "1", "--run-id", bad, expect=0)  # an existing run, so the preflight is recorded
        api.queue(Scripted(403, json.dumps({"message": f"key {key} is not allowed"}).encode()))
        res = run("--stages", "1", "--run-id", bad, expect=1)
        assert "Preflight failed" in res.stderr and "HTTP 403" in res.stderr and masked in res.stderr
        # The preflight passes, then stage 1 meets the same answer.
        api.queue(Scripted(200, b"[]"), Scripted(403, json.dumps({"message": f"key {key} is not allowed"}).encode()))
        res = run("--stages", "1", "--run-id", cut, expect=1)
        assert "stage 01_ingest FAILED" in res.stderr and "HTTP 403" in res.stderr
        assert masked in runs.read_json(runs.manifest_path(settings, cut))["stages"]["01_ingest"]["error"]
        # The API unreachable (a closed port), the snapshot used instead: the reason says why, masked.
        closed = url.replace(f":{api.port}/", f":{closed_port()}/")
        run("--stages", "1", "--run-id", f"{cut}-snap", extra={"API_BASE_URL": closed, "SNAPSHOT_FALLBACK": "true"},
            expect=0)
        reason = runs.read_json(runs.manifest_path(settings, f"{cut}-snap"))["stages"]["01_ingest"]["details"]
        assert reason["origin"] == "snapshot" and "***" in reason["fallback_reason"]
    finally:
        marquez.close()

    files = [p for d in (settings.outputs_dir, settings.logs_dir) for p in d.rglob("*") if p.is_file()]
    assert {"01_ingest.ipynb", "01_ingest.html", "openlineage.jsonl", "report.html"} <= {p.name for p in files}
    assert [(str(p), label) for p in files for label, value in scanned.items()
            if value.encode() in p.read_bytes()] == []
    assert [(uri, label) for uri, meta in every_object_metadata(settings).items() for label, value in scanned.items()
            if value in json.dumps(meta)] == []
    assert marquez.posts and [(p["path"], label) for p in marquez.posts for label, value in scanned.items()
                              if value.encode() in p["body"]] == []
    assert [p["json"]["title"] for p in webhook.posts] == [
        f"countries-medallion: run {r} FAILED" for r in (bad, cut)] + [f"countries-medallion: run {cut}-snap SUCCEEDED"]
    assert [label for p in webhook.posts for label, value in scanned.items() if value.encode() in p["body"]] == []
    assert [(" ".join(r.args[2:]), label) for r in outputs for label, value in scanned.items()
            if value in r.stdout or value in r.stderr] == []
