"""lib.alerts: which runs deserve an alert, and real runs alerting a real local webhook server and a
real local SMTP server through Apprise; a destination that is down never changes a run's outcome, one
that refuses, hangs, answers slowly or fails costs a run at most the side channels' budget, and no
credential is ever part of a message."""

from __future__ import annotations

import json
import logging
import uuid
from email import message_from_bytes

import pytest

from lib import alerts, contract, outbox, runs
from lib.config import ConfigError
from tests.sinks import MISBEHAVING, SLOW_S, HttpSink, Misbehaving, SmtpSink, closed_port, timed


def _manifest(status="succeeded", **stages):
    return {"run_id": "r1", "status": status, "stages": {s: e for s, e in stages.items()}}


# --- what deserves an alert ----------------------------------------------------------------------------

def test_a_clean_successful_run_deserves_no_alert():
    m = _manifest(**{"01_ingest": {"status": "succeeded", "details": {"origin": "api"}},
                     "02_clean": {"status": "succeeded", "details": {"quarantined": 0}}})
    assert alerts.reasons(m) == []


def test_reasons_name_the_failure_the_snapshot_and_the_quarantine():
    m = _manifest("failed", **{
        "01_ingest": {"status": "succeeded", "details": {"origin": "snapshot"}},
        "02_clean": {"status": "succeeded", "details": {"quarantined": 3}},
        "03_load": {"status": "failed", "error": "cell [5]: DatabaseError: loading failed"}})
    assert alerts.reasons(m) == ["stage 03_load failed: cell [5]: DatabaseError: loading failed",
                                 "the API could not be reached: the bundled snapshot was used",
                                 "3 records quarantined (threshold 0)"]


def test_the_quarantine_threshold_is_a_setting():
    m = _manifest(**{"02_clean": {"status": "succeeded", "details": {"quarantined": 3}}})
    assert alerts.reasons(m, quarantine_threshold=3) == []
    assert alerts.reasons(m, quarantine_threshold=2) == ["3 records quarantined (threshold 2)"]
    assert alerts.settings({"ALERT_QUARANTINE_THRESHOLD": "7", "PIPELINE_ENV_FILE": ""})[1] == 7
    for bad in ("many", "-1"):
        with pytest.raises(ConfigError, match="ALERT_QUARANTINE_THRESHOLD"):
            alerts.settings({"ALERT_QUARANTINE_THRESHOLD": bad})


def test_a_failed_reconciliation_is_said_as_such():
    m = _manifest("failed", **{"05_gold": {"status": "failed", "error": "cell [9]: ReconciliationError: "
                                           "reconciliation failed at hop 'export → gold': 249 records"}})
    assert alerts.reasons(m)[0].startswith("reconciliation failed in 05_gold: ")


def test_alert_urls_are_split_on_commas_and_spaces_and_may_come_from_a_file(tmp_path):
    path = tmp_path / "alert_urls"
    path.write_text("json://127.0.0.1:1/a, mailto://127.0.0.1:2?to=a@example.com\n  json://127.0.0.1:3/b\n")
    urls, threshold = alerts.settings({"ALERT_URLS_FILE": str(path)})
    assert urls == ["json://127.0.0.1:1/a", "mailto://127.0.0.1:2?to=a@example.com", "json://127.0.0.1:3/b"]
    assert threshold == 0


def test_the_message_is_short_and_says_where_the_record_is(tmp_path):
    found = ["stage 03_load failed: " + "x" * 1000 + "\nTraceback line"]
    title, body = alerts.message({"run_id": "r1", "status": "failed"}, tmp_path / "r1", found)
    assert title == "countries-medallion: run r1 FAILED"
    lines = body.splitlines()
    assert lines[0] == "run r1 FAILED" and lines[-1] == f"record: {tmp_path / 'r1' / 'manifest.json'}"
    assert len(lines) == 3 and len(lines[1]) < 320



ERROR = "cell [5]: InFailedSqlTransaction: the current transaction is aborted, commands ignored until end " * 6


def test_a_long_reason_is_cut_at_a_word_in_the_message(tmp_path):
    _, body = alerts.message({"run_id": "r1", "status": "failed"}, tmp_path / "r1", ["stage 03_load failed: " + ERROR])
    line = body.splitlines()[1]
    assert len(line) <= len("- ") + alerts.MAX_ERROR and line.endswith("…")
    words = line[len("- "):-1].split()
    assert words == ("stage 03_load failed: " + ERROR).split()[:len(words)]  # every word whole


def test_a_long_reason_is_cut_at_a_word_in_the_log_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ALERT_URLS", "")
    caplog.set_level(logging.INFO, logger="lib.alerts")
    failed = _manifest("failed", **{"05_gold": {"status": "failed", "error": ERROR}})
    assert alerts.after_run(failed, tmp_path / "r1") == 0
    [line] = [m for m in caplog.messages if "needs attention" in m]
    reason = line.split("(", 1)[1].rsplit(")", 1)[0]
    assert reason.endswith("…") and len(reason) <= alerts.MAX_LOGGED
    words = reason[:-1].split()
    assert words == ("stage 05_gold failed: " + ERROR).split()[:len(words)]

# --- a destination that refuses, hangs, answers slowly or fails ------------------------------------------

SLACK_S = 0.5  # beyond the budget: a busy machine


@pytest.fixture(params=MISBEHAVING)
def misbehaving(request):
    service = Misbehaving(request.param)
    yield service
    service.close()


def test_a_misbehaving_destination_costs_at_most_the_budget_and_is_logged_once(misbehaving, tmp_path,
                                                                              monkeypatch, caplog):
    monkeypatch.setenv("ALERT_URLS", f"json://127.0.0.1:{misbehaving.port}/hook")
    caplog.set_level(logging.INFO)
    failed = _manifest("failed", **{"03_load": {"status": "failed", "error": "cell [5]: DatabaseError: boom"}})

    def the_run_ends():
        queued = alerts.after_run(failed, tmp_path / "r1")
        return queued, outbox.flush_all()

    (queued, outcomes), seconds = timed(the_run_ends, limit=outbox.BUDGET_S + 10)
    assert seconds <= outbox.BUDGET_S + SLACK_S, f"{misbehaving.kind}: {seconds:.2f} s"
    assert queued == 1
    [outcome] = outcomes
    assert outcome.what == alerts.WHAT and outcome.destination.startswith(f"json://127.0.0.1:{misbehaving.port}/hook")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("lib")]
    if misbehaving.kind == "slow":  # SLOW_S is well within the budget
        assert SLOW_S < outbox.BUDGET_S and outcome.delivered == ["countries-medallion: run r1 FAILED"]
        assert warnings == [] and f"alert sent to {outcome.destination}" in caplog.messages
    else:
        assert outcome.delivered == [] and outcome.not_delivered == ["countries-medallion: run r1 FAILED"]
        assert warnings == [f"alert to {outcome.destination} was not delivered (the run's outcome is unchanged): "
                            f"{outcome.error}"]


# --- real runs, real destinations ------------------------------------------------------------------------

@pytest.fixture
def webhook():
    sink = HttpSink()
    yield sink
    sink.close()


@pytest.fixture
def smtp():
    sink = SmtpSink()
    yield sink
    sink.close()


def _mail_text(envelope) -> str:
    mail = message_from_bytes(envelope.content)
    parts = [p for p in mail.walk() if p.get_content_type() == "text/plain"]
    return mail["Subject"] + "\n" + parts[0].get_payload(decode=True).decode()


def test_quarantine_alert_reaches_a_webhook_and_a_mailbox_once_without_secrets(run_pipeline, settings, api,
                                                                             webhook, smtp, unique):
    bad = {**api.records[0], "name": {"common": f"Nowhere {unique}", "official": "Nowhere"}, "population": -5}
    api.records = api.records + [bad]
    token = f"SENTINELTOKEN{uuid.uuid4().hex}"
    urls = (f"json://alerts:{token}@127.0.0.1:{webhook.port}/hook, "
            f"mailto://127.0.0.1:{smtp.port}?from=pipeline@example.com&to=ops@example.com&mode=insecure")
    run_id = f"alert-{unique}"
    res = run_pipeline("--stages", "1-2", "--run-id", run_id, env={"ALERT_URLS": urls})
    assert res.returncode == 0, res.stderr[-3000:]
    record = runs.run_dir(settings, run_id)

    assert len(webhook.posts) == 1 and len(smtp.messages) == 1
    post = webhook.posts[0]
    assert post["path"] == "/hook"
    assert post["json"]["title"] == f"countries-medallion: run {run_id} SUCCEEDED"
    body = post["json"]["message"]
    assert body.splitlines() == [f"run {run_id} SUCCEEDED", "- 1 records quarantined (threshold 0)",
                                 f"record: {record / 'manifest.json'}"]
    mail = _mail_text(smtp.messages[0])
    assert smtp.messages[0].rcpt_tos == ["ops@example.com"]
    assert f"run {run_id} SUCCEEDED" in mail and "1 records quarantined" in mail and str(record) in mail

    # Nothing secret: neither the stack's credentials nor the token in the destination URL, anywhere.
    secrets = settings.secrets() + [token]
    sent = json.dumps(post["json"]) + repr(post["headers"]) + mail
    assert [s for s in settings.secrets() if s in sent] == []
    assert token not in json.dumps(post["json"]) and token not in mail
    written = [p for d in (record, settings.logs_dir) for p in d.rglob("*") if p.is_file()]
    assert [str(p) for p in written for s in secrets if s.encode() in p.read_bytes()] == []
    assert token not in res.stdout + res.stderr
    assert "alert sent to json://alerts:****@127.0.0.1" in res.stderr


def test_a_failed_run_alerts_once_and_keeps_its_exit_code(run_pipeline, settings, webhook, unique):
    run_id = f"alertfail-{unique}"
    base = f"base-{unique}"  # a run for stage 4 to read from: a new run after stage 1 needs one
    runs.RunRecord.open(settings, base, ["01_ingest"], {}).finish("failed")
    res = run_pipeline("--stages", "4", "--run-id", run_id, "-p", f"table=missing_{unique}", "-p", f"input_run={base}",
                       env={"ALERT_URLS": f"json://127.0.0.1:{webhook.port}/"})
    assert res.returncode == 1 and "stage 04_export FAILED" in res.stderr
    assert len(webhook.posts) == 1
    lines = webhook.posts[0]["json"]["message"].splitlines()
    assert lines[0] == f"run {run_id} FAILED"
    assert lines[1].startswith("- stage 04_export failed: ") and "does not exist" in lines[1]
    assert lines[2] == f"record: {runs.run_dir(settings, run_id) / 'manifest.json'}"


def test_a_run_stopped_by_its_preflight_alerts_once_saying_nothing_ran(run_pipeline, settings, webhook, unique):
    run_id = f"alertpre-{unique}"
    dead = closed_port()
    url = f"http://127.0.0.1:{dead}/v3.1/all?fields={','.join(contract.SOURCE_FIELDS)}"
    res = run_pipeline("--run-id", run_id, env={"API_BASE_URL": url, "SNAPSHOT_FALLBACK": "false",
                                                "ALERT_URLS": f"json://127.0.0.1:{webhook.port}/"})
    assert res.returncode == 1 and "Preflight failed" in res.stderr
    assert not runs.run_dir(settings, run_id).exists()  # still no record for a run that never started
    assert len(webhook.posts) == 1
    lines = webhook.posts[0]["json"]["message"].splitlines()
    assert lines[0] == f"run {run_id} FAILED"
    assert lines[1].startswith("- preflight failed: API ") and url in lines[1] and "snapshot fallback is off" in lines[1]
    assert lines[2].startswith("nothing ran and no run record was written; log: ")
    assert lines[2].split("log: ")[1].startswith(str(settings.logs_dir))


def test_snapshot_fallback_with_every_destination_down_still_succeeds(run_pipeline, settings, unique, webhook):
    webhook.status = 500  # one destination answers with an error, the others do not answer at all
    run_id = f"alertdown-{unique}"
    dead = closed_port()
    urls = (f"json://127.0.0.1:{dead}/ mailto://127.0.0.1:{dead}?to=ops@example.com&from=p@example.com"
            f"&mode=insecure json://127.0.0.1:{webhook.port}/ not-a-destination")
    res = run_pipeline("--stages", "1", "--run-id", run_id, env={
        "API_BASE_URL": f"http://127.0.0.1:{dead}/v3.1/all?fields={','.join(contract.SOURCE_FIELDS)}",
        "SNAPSHOT_FALLBACK": "true", "ALERT_URLS": urls})
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"run {run_id} SUCCEEDED" in res.stdout
    m = runs.read_json(runs.manifest_path(settings, run_id))
    assert m["status"] == "succeeded" and m["stages"]["01_ingest"]["details"]["origin"] == "snapshot"
    assert len(webhook.posts) == 1  # it was tried, and its 500 is only logged
    assert "bundled snapshot was used" in webhook.posts[0]["json"]["message"]
    assert res.stderr.count("was not delivered (the run's outcome is unchanged)") == 3
    assert "alert destination 4 of ALERT_URLS is not a URL Apprise understands" in res.stderr
