"""Where every object lives: each key of each layer is built here and nowhere else.

    raw        countries/ingest_date=D/run_id=R/countries.json          (bytes as the API sent them)
    clean      countries/ingest_date=D/run_id=R/capitals_clean.<ext>
               quarantine/ingest_date=D/run_id=R/quarantine.<ext>
    cloud      <prefix>/<table>/run_id=R/<table>.csv                      (+ <prefix>/<table>/latest/)
    gold       countries/run_id=R/<table>.<ext>, aggregates/run_id=R/<aggregate>.<ext> (one per
               lib/aggregates.py), changes/run_id=R/changes.json                       (+ …/latest/…)

A `latest` key is the run-scoped key with `run_id=R` replaced by `latest`.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

from lib import names

DATASET = "countries"
RAW_NAME = "countries.json"
CLEAN_NAME = "capitals_clean"
QUARANTINE = "quarantine"
AGGREGATES = "aggregates"
CHANGES = "changes"
LATEST = "latest"
# Where the published run of each table is named, apart from the data's own keys: it is found the
# same way wherever the objects are written (a run's objects are where its record says they are).
PUBLISHED = "_published"


def ingest_date(run_id: str) -> str:
    """The partition date of a run: from its id when it is a generated one (`lab-`/`papermill-` ids
    of interactive runs included), else today (UTC)."""
    match = re.match(r"^(?:[a-z]+-)?(\d{4})(\d{2})(\d{2})T", run_id)
    if match:
        return "-".join(match.groups())
    return f"{datetime.now(timezone.utc):%Y-%m-%d}"


def _partition(date: str, run_id: str) -> str:
    return f"ingest_date={date}/run_id={names.run_id(run_id)}"


def raw_key(run_id: str) -> str:
    return f"{DATASET}/{_partition(ingest_date(run_id), run_id)}/{RAW_NAME}"


def dataset_prefix(date: str | None = None) -> str:
    """Where to list raw or clean objects: all of them, or those of one ingest date."""
    return f"{DATASET}/ingest_date={date}/" if date else f"{DATASET}/"


def clean_key(date: str, run_id: str, extension: str) -> str:
    return f"{DATASET}/{_partition(date, run_id)}/{CLEAN_NAME}.{extension}"


def quarantine_key(date: str, run_id: str, extension: str) -> str:
    return f"{QUARANTINE}/{_partition(date, run_id)}/{QUARANTINE}.{extension}"


def is_quarantine(key: str) -> bool:
    return key.startswith(f"{QUARANTINE}/")


def is_changes(key: str) -> bool:
    return key.startswith(f"{CHANGES}/") and key.endswith("/changes.json")


def is_clean(key: str) -> bool:
    return key.rsplit("/", 1)[-1].startswith(CLEAN_NAME + ".")


def export_key(prefix: str, table: str, run_id: str) -> str:
    lead = f"{prefix}/" if prefix else ""
    return f"{lead}{table}/run_id={names.run_id(run_id)}/{table}.csv"


def gold_table_key(table: str, run_id: str, extension: str) -> str:
    return f"{DATASET}/run_id={names.run_id(run_id)}/{table}.{extension}"


def is_gold_table(key: str) -> bool:
    """A gold table's key (run-scoped or `latest`), not an aggregate's or the change report's."""
    return re.fullmatch(rf"{DATASET}/(?:run_id=[^/]+|{LATEST})/[^/]+", key) is not None


def aggregate_key(name: str, run_id: str, extension: str) -> str:
    return f"{AGGREGATES}/run_id={names.run_id(run_id)}/{name}.{extension}"


def changes_key(run_id: str) -> str:
    return f"{CHANGES}/run_id={names.run_id(run_id)}/changes.json"


def published_key(table: str) -> str:
    """The pointer naming a table's published run and where its gold table is."""
    return f"{PUBLISHED}/{names.sql_identifier(table, 'table')}.json"


def pending_key(table: str) -> str:
    """A publish under way for a table: what it moves, written before its first copy, removed after
    its pointer."""
    return f"{PUBLISHED}/{names.sql_identifier(table, 'table')}.pending.json"


def pending_table(key: str) -> str | None:
    """The table of a pending publish's key, or None for any other key."""
    found = re.fullmatch(rf"{PUBLISHED}/([a-z_][a-z0-9_]*)\.pending\.json", key)
    return found.group(1) if found else None


def latest(key: str) -> str:
    """The stable `latest` key of a run-scoped key."""
    found = re.search(r"/run_id=[^/]+/", key)
    if not found:
        raise ValueError(f"{key!r} is not a run-scoped key")
    return f"{key[:found.start()]}/{LATEST}/{key[found.end():]}"


def run_of(key: str) -> str | None:
    found = re.search(r"/run_id=([^/]+)/", key)
    return found.group(1) if found else None


def date_of(key: str) -> str | None:
    found = re.search(r"ingest_date=([^/]+)/", key)
    return found.group(1) if found else None
