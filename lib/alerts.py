"""One short message when a run needs a person's attention, sent with Apprise.

A run is worth an alert when it failed (or was interrupted), fell back to the bundled snapshot,
quarantined more records than ALERT_QUARANTINE_THRESHOLD (default 0: any), or failed reconciliation.
The message says the run id, what happened and where the run record is; nothing else (no settings,
no credentials).

Destinations are Apprise URLs in ALERT_URLS (or a file named by ALERT_URLS_FILE), separated by commas
or spaces: `slack://...`, `msteams://...`, `mailto://user:pass@host?smtp=...`, `json://host:port/path`
and the many others Apprise knows. The message goes out in the background, through each destination's
outbox (lib/outbox.py): the run waits for it only at its end, within the side channels' budget, so a
destination that refuses, hangs or fails costs a run at most that. A destination that cannot be
reached is logged once and never changes the run's outcome.
"""

from __future__ import annotations

import logging
import re
from functools import partial
from pathlib import Path

from lib import config, outbox, redact, registry, runs, terminal
from lib.registry import Layer

log = logging.getLogger(__name__)

TITLE = "countries-medallion"
WHAT = "alert"  # what the outbox says it sends
MAX_ERROR = 300  # characters of each reason in a message, cut at a word (lib/terminal.py `shorten`)
MAX_LOGGED = 120  # the same, of each reason in the log line when no destination is configured


def settings(env: dict[str, str] | None = None) -> tuple[list[str], int]:
    """(destination URLs, quarantine threshold) from the environment and `.env`."""
    env = config.resolve_secret_files(config.environment() if env is None else env)
    urls = [u for u in re.split(r"[,\s]+", env.get("ALERT_URLS", "")) if u]
    raw = env.get("ALERT_QUARANTINE_THRESHOLD") or "0"
    try:
        threshold = int(raw)
    except ValueError:
        raise config.ConfigError(f"ALERT_QUARANTINE_THRESHOLD={raw!r} is not a whole number") from None
    if threshold < 0:
        raise config.ConfigError(f"ALERT_QUARANTINE_THRESHOLD={threshold} must not be negative")
    return urls, threshold


def reasons(manifest: dict, quarantine_threshold: int = 0) -> list[str]:
    """What in this run deserves an alert, as short phrases (empty: nothing)."""
    found = []
    stages = manifest.get("stages", {})
    status = manifest.get("status")
    if status in runs.ENDED_BADLY:
        bad = [(s, e) for s, e in stages.items() if e.get("status") in runs.ENDED_BADLY]
        if bad:
            stage, entry = bad[-1]
            error = entry.get("error") or status
            if "ReconciliationError" in error:
                found.append(f"reconciliation failed in {stage}: {error}")
            else:
                found.append(f"stage {stage} {entry.get('status')}: {error}")
        elif manifest.get("preflight"):
            found.append("preflight failed: " + "; ".join(manifest["preflight"]))
        else:
            found.append(f"run {status}")
    ingest = stages.get(registry.writer_of(Layer.RAW).name, {}).get("details", {})
    if ingest.get("origin") == "snapshot":
        found.append("the API could not be reached: the bundled snapshot was used")
    quarantined = stages.get(registry.writer_of(Layer.QUARANTINE).name, {}).get("details", {}).get("quarantined") or 0
    if quarantined > quarantine_threshold:
        found.append(f"{quarantined} records quarantined (threshold {quarantine_threshold})")
    return found


def message(manifest: dict, record_dir: Path, found: list[str], log_file: Path | None = None) -> tuple[str, str]:
    """(title, body): run id, status, what happened, where the record is (or, for a run that never
    started and left no record, where its log is)."""
    run_id = manifest.get("run_id", "?")
    status = str(manifest.get("status", "?")).upper()
    lines = [f"run {run_id} {status}"]
    for reason in found:
        reason = " ".join(reason.split())  # one line each: tracebacks and tables are in the record
        lines.append("- " + terminal.shorten(reason, MAX_ERROR))
    if log_file is not None and not (record_dir / "manifest.json").exists():
        lines.append(f"nothing ran and no run record was written; log: {log_file}")
    else:
        lines.append(f"record: {record_dir / 'manifest.json'}")
    return f"{TITLE}: run {run_id} {status}", "\n".join(lines)


def send(urls: list[str], title: str, body: str, secrets: list[str] = ()) -> int:
    """Put the message in each destination's outbox (sent in the background; `outbox.flush_all` waits
    for it). Returns how many destinations it was queued for; never raises. Destinations are named
    in Apprise's privacy form (tokens and passwords masked)."""
    with outbox.charged():
        import apprise

        title, body = redact.text(title, secrets), redact.text(body, secrets)
        queued = 0
        for n, url in enumerate(urls, start=1):
            server = apprise.Apprise.instantiate(url)
            if not server:
                log.warning("alert destination %d of ALERT_URLS is not a URL Apprise understands; skipped", n)
                continue
            outbox.get(WHAT, server.url(privacy=True)).put(title, partial(_notify, server, title, body))
            queued += 1
    return queued


def _notify(server, title: str, body: str) -> None:
    try:
        ok = server.notify(body=body, title=title)
    except Exception as err:  # noqa: BLE001 - its type only: the text may hold the URL's token
        raise outbox.NotDelivered(type(err).__name__) from None
    if not ok:
        raise outbox.NotDelivered("refused or unreachable (Apprise's own line says which)")


def after_run(manifest: dict, record_dir: Path, secrets: list[str] = (), log_file: Path | None = None) -> int:
    """The runner's hook after a run ends, or fails its preflight: alert if anything deserves it.
    Returns how many destinations the alert was queued for. Never raises."""
    try:
        urls, threshold = settings()
        found = reasons(manifest, threshold)
        if not found:
            return 0
        if not urls:
            log.info("run %s needs attention (%s); no ALERT_URLS configured", manifest.get("run_id"),
                     "; ".join(terminal.shorten(r.split("\n")[0], MAX_LOGGED) for r in found))
            return 0
        title, body = message(manifest, record_dir, found, log_file)
        return send(urls, title, body, list(secrets))
    except Exception as err:  # noqa: BLE001
        log.warning("alerts not sent: %s", err)
        return 0
