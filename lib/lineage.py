"""OpenLineage run events for each stage, built from the run record with the official client.

Each stage attempt is one OpenLineage run of the job `countries_medallion.<stage>`: START when it
begins, then COMPLETE, FAIL or ABORT (interrupted) when it ends. The end event carries the stage's
input and output datasets named the OpenLineage way (`s3://<bucket>` + key, `postgres://host:port` +
`db.schema.table`), the rows and bytes written (outputStatistics) and, for datasets holding the
contract's rows, their columns (schema). A parent facet ties the stage runs of one pipeline run.

Where events go:
- always (unless OPENLINEAGE_DISABLED=true): `outputs/runs/<id>/openlineage.jsonl`, one event a line,
  through the client's FileTransport, written before the hook returns: the run's copy is complete;
- also wherever the client's own settings point: OPENLINEAGE_URL (+ OPENLINEAGE_API_KEY,
  OPENLINEAGE_ENDPOINT), OPENLINEAGE__TRANSPORT__* variables, or an openlineage.yml (OPENLINEAGE_CONFIG,
  the working folder, ~/.openlineage/). Those may also be set in `.env`. These are sent in the
  background, in order, by the destination's outbox (lib/outbox.py): the run waits for them only at
  its end, within the side channels' budget, and its record says which were not delivered.

Lineage is a side channel: an event that cannot be written or sent is logged and the run goes on.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from contextlib import contextmanager
from functools import cache, partial
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

from lib import config, contract, layout, outbox, runs, source

if TYPE_CHECKING:
    from openlineage.client import OpenLineageClient
    from openlineage.client.event_v2 import InputDataset, OutputDataset, RunEvent
    from openlineage.client.facet_v2 import schema_dataset

log = logging.getLogger(__name__)

EVENTS_FILE = "openlineage.jsonl"
WHAT = "OpenLineage event"  # what the outbox says it sends
# One HTTP attempt to a lineage service: connected within a second, answered within two; a 5xx answer
# is tried once more at once, a refused or silent service is not (the client's own default retries
# each event 5 times with backoff, and logs each retry). The run waits for none of it (lib/outbox.py),
# but a dead service must not keep the sender busy while the next events queue behind it. Where the
# client's settings are stricter, they stand.
HTTP_TIMEOUT_S = (1.0, 2.0)
HTTP_RETRY = {"total": 1, "connect": 0, "read": 0, "other": 0, "status": 1, "backoff_factor": 0.0,
              "respect_retry_after_header": False}
DEFAULT_NAMESPACE = "countries-medallion"
PIPELINE_JOB = "countries_medallion"
# Run ids are UUIDs in OpenLineage: derived from ours, so START and its end event share one.
_UUID_NS = uuid.UUID("5b3c8f0e-8a57-4a55-9e4e-4c6f3c9d7a11")
_END_STATES = {"succeeded": "COMPLETE", "failed": "FAIL", "interrupted": "ABORT", "abandoned": "ABORT"}


@cache
def _ol() -> SimpleNamespace:
    """The OpenLineage client's classes, imported when an event is first built (~0.2 s of CPU with
    attrs): every stage's kernel imports this module, and the kernel of a runner's run builds none
    (the runner sends them)."""
    from openlineage.client import OpenLineageClient
    from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
    from openlineage.client.facet_v2 import (
        error_message_run,
        job_type_job,
        output_statistics_output_dataset,
        parent_run,
        schema_dataset,
    )
    from openlineage.client.naming import dataset as naming
    from openlineage.client.transport.file import FileConfig, FileTransport
    from openlineage.client.transport.http import HttpTransport

    return SimpleNamespace(**locals())


def namespace() -> str:
    """The job namespace: OPENLINEAGE_NAMESPACE, as the OpenLineage integrations read it."""
    return os.environ.get("OPENLINEAGE_NAMESPACE") or DEFAULT_NAMESPACE


def run_uuid(run_id: str, stage: str | None = None, attempt: int = 0) -> str:
    """The OpenLineage runId of a pipeline run (stage None) or of one attempt of a stage."""
    return str(uuid.uuid5(_UUID_NS, f"{run_id}/{stage or ''}/{attempt}"))


def dataset_name(uri: str) -> tuple[str, str]:
    """(namespace, name) of a manifest URI, after the OpenLineage naming conventions."""
    parts, naming = urlsplit(uri), _ol().naming
    if parts.scheme == "s3":
        n = naming.S3(bucket_name=parts.netloc, object_key=parts.path.lstrip("/"))
    elif parts.scheme in ("postgresql", "postgres"):
        database, _, qualified = parts.path.lstrip("/").partition("/")
        schema, _, table = qualified.partition(".")
        n = naming.Postgres(host=parts.hostname, port=str(parts.port or 5432), database=database,
                            schema=schema, table=table)
    elif parts.scheme in ("http", "https"):  # the API: its endpoint, without userinfo nor the query
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}", parts.path or "/"
    elif uri.startswith("bundled snapshot "):
        n = naming.LocalFileSystem(path=str(config.ROOT / uri.removeprefix("bundled snapshot ")))
    else:
        n = naming.LocalFileSystem(path=uri)
    return n.get_namespace(), n.get_name()


def _holds_contract_rows(obj: dict, details: dict) -> bool:
    """Datasets whose rows are the contract's: the clean object, the table, the export, the gold
    table (not the raw JSON, the quarantine, aggregates or the change report)."""
    key = obj.get("key", "")
    return (obj.get("role") == "database" or layout.is_clean(key) or key == details.get("key")
            or layout.is_gold_table(key))


def schema_facet(upper: bool = False) -> schema_dataset.SchemaDatasetFacet:
    """The contract's columns; upper-case names for an export written with column_case=upper."""
    schema_dataset = _ol().schema_dataset
    return schema_dataset.SchemaDatasetFacet(fields=[
        schema_dataset.SchemaDatasetFacetFields(name=c.name.upper() if upper else c.name,
                                                type=c.type.sql,
                                                description=c.description, ordinal_position=i)
        for i, c in enumerate(contract.CONTRACT, start=1)])


def datasets(entry: dict) -> tuple[list[InputDataset], list[OutputDataset]]:
    """The inputs and outputs of a finished stage, from its manifest entry."""
    ol = _ol()
    details = entry.get("details") or {}
    upper = details.get("column_case") == "upper"
    outputs, inputs, seen = [], [], set()
    for obj in entry.get("objects") or []:
        ns, name = dataset_name(obj["uri"])
        facets = {}
        if _holds_contract_rows(obj, details):
            facets["schema"] = schema_facet(upper and obj.get("key") == details.get("key"))
        output_facets = {"outputStatistics": ol.output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
            rowCount=obj.get("rows"), size=obj.get("size"))}
        outputs.append(ol.OutputDataset(namespace=ns, name=name, facets=facets, outputFacets=output_facets))
        for src in obj.get("inputs") or []:
            if src not in seen:
                seen.add(src)
                ns, name = dataset_name(src)
                inputs.append(ol.InputDataset(namespace=ns, name=name))
    return inputs, outputs


def stage_event(run_id: str, stage: str, entry: dict, state: str) -> RunEvent:
    """One event of one stage attempt, from the stage's manifest entry; `state` is its RunState's
    name (START, COMPLETE, FAIL, ABORT)."""
    ol = _ol()
    parent_run = ol.parent_run
    attempt = len(entry.get("attempts") or [])
    run_facets = {"parent": parent_run.ParentRunFacet(
        run=parent_run.Run(runId=run_uuid(run_id)),
        job=parent_run.Job(namespace=namespace(), name=PIPELINE_JOB),
        root=parent_run.Root(run=parent_run.RootRun(runId=run_uuid(run_id)),
                             job=parent_run.RootJob(namespace=namespace(), name=PIPELINE_JOB)))}
    inputs, outputs = [], []
    if state == "START":
        when = entry.get("started")
    else:
        when = entry.get("ended")
        if state == "COMPLETE":
            inputs, outputs = datasets(entry)
        elif entry.get("error"):
            run_facets["errorMessage"] = ol.error_message_run.ErrorMessageRunFacet(
                message=entry["error"][:2000], programmingLanguage="python")
    job_facets = {"jobType": ol.job_type_job.JobTypeJobFacet(processingType="BATCH", integration="PAPERMILL",
                                                             jobType="NOTEBOOK")}
    return ol.RunEvent(eventType=ol.RunState[state], eventTime=when or _now(),
                       run=ol.Run(runId=run_uuid(run_id, stage, attempt), facets=run_facets),
                       job=ol.Job(namespace=namespace(), name=f"{PIPELINE_JOB}.{stage}", facets=job_facets),
                       inputs=inputs, outputs=outputs)


def _now() -> str:
    return runs.now()


# --- transports ----------------------------------------------------------------------------------

@contextmanager
def _quiet(name: str):
    """The client logs which transport it uses, and warns when nothing is configured (it would print
    to the console): here that only means no lineage service, since the run folder gets the events."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _dotenv_into_environ() -> None:
    """OPENLINEAGE_* settings from `.env` too, as the client reads only the process environment."""
    for key, value in config.environment().items():
        if value and key.startswith("OPENLINEAGE") and key not in os.environ:
            os.environ[key] = value


def clients(run_dir: Path) -> list[OpenLineageClient]:
    """The run folder's file client, and the configured one when the client's settings name any."""
    _dotenv_into_environ()
    ol = _ol()
    with _quiet("openlineage"):
        configured = ol.OpenLineageClient()
        if configured.transport.kind == "noop":  # OPENLINEAGE_DISABLED=true
            return []
        run_dir.mkdir(parents=True, exist_ok=True)
        out = [ol.OpenLineageClient(transport=ol.FileTransport(ol.FileConfig(
            log_file_path=str(run_dir / EVENTS_FILE), append=True)))]
    if configured.transport.kind != "console":
        out.append(configured)
    return out


def _bounded(transport) -> None:
    """HTTP_TIMEOUT_S and HTTP_RETRY on an HTTP transport (before its first request builds its session)."""
    if not isinstance(transport, _ol().HttpTransport):
        return
    timeout = transport.timeout
    if isinstance(timeout, (int, float)):
        transport.timeout = tuple(min(timeout, cap) for cap in HTTP_TIMEOUT_S)
    retry = dict(transport.config.retry)
    for key, cap in HTTP_RETRY.items():
        mine = retry.get(key)
        stricter = isinstance(mine, (int, float)) and not isinstance(mine, bool) and mine < cap
        retry[key] = mine if stricter else cap
    transport.config.retry = retry


def destination(client: OpenLineageClient) -> str:
    """Where a client sends, without credentials: an HTTP service's URL, or the transport's kind."""
    transport = client.transport
    if isinstance(transport, _ol().HttpTransport):
        parts = urlsplit(urljoin(transport.url, transport.endpoint))
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
    return f"the {transport.kind} transport"


def _deliver(client: OpenLineageClient, event: RunEvent) -> None:
    try:
        client.emit(event)
    except Exception as err:  # noqa: BLE001 - said in one phrase, once, by the outbox
        raise outbox.NotDelivered(source.short_error(err)) from None
    finally:
        try:
            client.close(timeout=0)
        except Exception:  # noqa: BLE001
            pass


def emit(run_dir: Path, event: RunEvent) -> int:
    """Write one event to the run folder, and put it in the outbox of the configured destination
    (sent in the background). Returns how many destinations took it (written or queued). Never raises."""
    sent = 0
    try:
        targets = clients(run_dir)
    except Exception as err:  # noqa: BLE001 - a bad lineage setting must not stop the pipeline
        log.warning("OpenLineage: settings not usable (%s); no lineage event sent", err)
        return 0
    for client in targets:
        if client.transport.kind != _ol().FileTransport.kind:
            with outbox.charged():
                _bounded(client.transport)
                outbox.get(WHAT, destination(client)).put(f"{event.eventType.value} {event.job.name}",
                                                          partial(_deliver, client, event))
            sent += 1
            continue
        try:
            client.emit(event)
            sent += 1
        except Exception as err:  # noqa: BLE001
            log.warning("OpenLineage: %s event of %s not written to %s: %s", event.eventType.value,
                        event.job.name, run_dir / EVENTS_FILE, err)
        finally:
            try:
                client.close(timeout=5)
            except Exception:  # noqa: BLE001
                pass
    return sent


# --- hooks (called by the runner) -------------------------------------------------------------------

def stage_started(record, stage: str) -> None:
    """START of a stage attempt; `record` is the runner's RunRecord (`dir`, `run_id`, `data`)."""
    emit(record.dir, stage_event(record.run_id, stage, record.data["stages"][stage], "START"))


def stage_ended(record, stage: str) -> None:
    """COMPLETE, FAIL or ABORT of a stage attempt, with its datasets when it succeeded."""
    entry = record.data["stages"][stage]
    state = _END_STATES.get(entry.get("status"), "FAIL")
    emit(record.dir, stage_event(record.run_id, stage, entry, state))


def read_events(run_dir: Path) -> list[dict]:
    """The events written to a run folder, in order."""
    path = run_dir / EVENTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
