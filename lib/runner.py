"""Running the stage notebooks with papermill: preflight, executing each stage into the run folder,
signals, and the one-line summaries. `run_pipeline.py` is the command line over this module; the
stages themselves are declared in lib/registry.py.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from lib import config, db, registry, runs, source, stack, storage

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


# --- preflight -------------------------------------------------------------------------------------

def preflight(settings: config.Settings, stages: list[str], params: dict[str, dict]) -> list[str]:
    """Check that every service the chosen stages need (lib/registry.py) answers. Returns the
    problems (empty: go)."""
    import requests

    problems: list[str] = []
    for stage in registry.needing("api", stages):
        url = params.get(stage, {}).get("api_url") or settings.api_url
        try:
            source.check_url(url)
            with requests.get(url, timeout=(5, 30), stream=True) as response:
                if 400 <= response.status_code < 500 and response.status_code != 429:
                    # A request the API rejects will not get better by retrying: say so now, verbatim.
                    problems.append(f"API {url} answered HTTP {response.status_code}: {response.text[:500]}")
        except source.SourceError as err:
            problems.append(f"API: {err}")
        except requests.Timeout as err:
            log.warning("preflight: API %s is slow to answer (%s); stage 1 will wait and retry", url, source.short_error(err))
        except requests.RequestException as err:
            if settings.snapshot_fallback:
                log.warning("preflight: API %s unreachable (%s); the bundled snapshot will be used",
                            url, source.short_error(err))
            else:
                problems.append(f"API {url} unreachable ({source.short_error(err)}) and snapshot fallback is off")
    if registry.needing("store", stages):
        s3 = storage.client(settings.store)
        try:
            storage.check(s3)
        except storage.StorageError as err:
            problems.append(f"object store {settings.store.url}: {err}")
    if registry.needing("db", stages):
        try:
            db.connect(settings.db, attempts=2).close()
        except db.DatabaseError as err:
            problems.append(f"database: {err}")
    if registry.needing("cloud", stages):
        # A bucket on a real cloud must exist; an emulated one may be created by stage 4.
        cloud = storage.cloud_client(settings.cloud)
        try:
            storage.ensure_bucket(cloud, settings.cloud.bucket, create=settings.cloud.emulated)
        except Exception as err:  # noqa: BLE001
            problems.append(f"cloud bucket: {err}")
    return problems


# --- executing notebooks ----------------------------------------------------------------------------

class Interrupted(Exception):
    pass


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def failed_cell(err: Exception) -> str:
    """'cell [7]: ValueError: ...' from a papermill error, or the error itself."""
    import papermill

    if isinstance(err, papermill.PapermillExecutionError):
        return f"cell [{err.exec_count}]: {err.ename}: {err.evalue}"
    return f"{type(err).__name__}: {err}"


def execute(record: runs.RunRecord, stage: str, params: dict, *, kernel: str, start_timeout: int,
            cell_timeout: int) -> None:
    import papermill

    record.stage_started(stage)  # an earlier execution's record and notebook become an attempt
    started = time.monotonic()
    output = record.dir / f"{stage}.ipynb"
    log.info("stage %s: running %s", stage, output)
    # The kernel inherits this: it tells `stages.begin` that the runner owns the run's record.
    saved = os.environ.get(runs.RUNNER_ENV)
    os.environ[runs.RUNNER_ENV] = record.run_id
    try:
        papermill.execute_notebook(
            str(registry.get(stage).notebook), str(output),
            parameters={"run_id": record.run_id, **params},
            kernel_name=kernel, start_timeout=start_timeout, execution_timeout=cell_timeout,
            cwd=str(config.ROOT), progress_bar=False, log_output=False, request_save_on_cell_execute=True,
            # The kernel's own start-up warnings (loopback TCP transport) are noise in a run's output.
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )
    except Interrupted:
        record.stage_ended(stage, "interrupted", time.monotonic() - started, "interrupted")
        raise
    except BaseException as err:
        record.stage_ended(stage, "failed", time.monotonic() - started, failed_cell(err))
        raise
    finally:
        if saved is None:
            os.environ.pop(runs.RUNNER_ENV, None)
        else:
            os.environ[runs.RUNNER_ENV] = saved
    record.stage_ended(stage, "succeeded", time.monotonic() - started)


def summary_line(stage: str, entry: dict) -> str:
    status = entry.get("status", "?")
    text = f"  {stage:<10} {status:<11} {entry.get('duration_s', 0):>6.1f}s"
    if status == "succeeded":
        text += f"  rows {entry.get('rows_in')} → {entry.get('rows_out')}"
        objects = entry.get("objects", [])
        if objects:
            text += f"  ({len(objects)} object{'s' if len(objects) != 1 else ''}: {objects[0].get('uri')}"
            text += " …)" if len(objects) > 1 else ")"
        details = entry.get("details", {})
        if details.get("origin") == "snapshot":
            text += "  [BUNDLED SNAPSHOT: API unreachable]"
        if details.get("quarantined"):
            text += f"  [{details['quarantined']} quarantined]"
    elif entry.get("error"):
        text += f"  {entry['error'][:200]}"
    return text


def ensure_stack(env: dict[str, str]) -> None:
    """Start the embedded services this configuration relies on (a running one is reused)."""
    needed = tuple(s for s, embedded in (("object_store", config.uses_embedded_store(env)),
                                         ("database", config.uses_embedded_db(env))) if embedded)
    if needed:
        stack.up(config.state_dir(env), needed)


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)

