"""Running the stage notebooks with papermill: preflight, executing each stage into the run folder,
signals, the side channels settled at the end, and the one-line summaries. `run_pipeline.py` is the
command line over this module; the stages themselves are declared in lib/registry.py.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Empty

import requests

from lib import (config, db, files, kernels as kernels_, lineage, outbox, params, record_store, redact, registry, runs, source,
                 stack, storage, terminal)
from lib.stages import parameters

# papermill is imported where used: the run's kernel is started before it (run_pipeline.py), so that
# it boots while this process imports it.

log = logging.getLogger(__name__)


# --- preflight -------------------------------------------------------------------------------------

def check_configuration(env: dict[str, str]) -> None:
    """What a run needs from its configuration that can be checked before anything starts: the API
    URL (scheme, field count) and usable outputs and logs folders. Raises config.ConfigError."""
    if env.get("API_BASE_URL"):
        try:
            source.check_url(env["API_BASE_URL"])
        except source.SourceError as err:
            raise config.ConfigError(f"API_BASE_URL: {err}") from None
    config.check_folders(env)


def preflight(settings: config.Settings, stages: list[str], params: dict[str, dict],
              hints: dict[str, dict] | None = None) -> list[str]:
    """Check that every service the chosen stages need (lib/registry.py) answers. Returns the
    problems (empty: go). `hints`, when given, receives parameters for stages that follow from what
    was found: a stage whose API could not be reached tries it once, then goes to the snapshot,
    instead of spending its retry budget on it again."""

    def api(stage: str) -> list[str]:
        url = params.get(stage, {}).get("api_url") or settings.api_url
        # What is said about it shows the URL masked, and neither its credentials nor an answer echoing them.
        shown, hide = redact.url(url), lambda text: redact.text(text, redact.url_secrets(url))
        try:
            source.check_url(url)
            with requests.get(url, timeout=(5, 30), stream=True) as response:
                if 400 <= response.status_code < 500 and response.status_code != 429:
                    # A request the API rejects will not get better by retrying: say so now, verbatim.
                    return [f"API {shown} answered HTTP {response.status_code}: {hide(response.text[:500])}"]
        except source.SourceError as err:
            return [f"API: {err}"]
        except requests.Timeout as err:
            log.warning("preflight: API %s is slow to answer (%s); stage 1 will wait and retry", shown,
                        hide(source.short_error(err)))
        except requests.RequestException as err:
            if not settings.snapshot_fallback:
                return [f"API {shown} unreachable ({hide(source.short_error(err))}) and snapshot fallback is off "
                        f"({settings.why.get('snapshot_fallback', 'SNAPSHOT_FALLBACK')})"]
            log.warning("preflight: API %s unreachable (%s); the bundled snapshot will be used",
                        shown, hide(source.short_error(err)))
            if hints is not None:
                hints.setdefault(stage, {})["max_attempts"] = 1
        return []

    def store(s3) -> list[str]:
        try:
            storage.check(s3)
        except storage.StorageError as err:
            return [f"object store {settings.store.url}: {err}"]
        return []

    def database() -> list[str]:
        try:
            db.connect(settings.db, attempts=2).close()
        except db.DatabaseError as err:
            return [f"database: {err}"]
        return []

    def cloud_bucket(cloud) -> list[str]:
        # A bucket on a real cloud must exist; an emulated one may be created by stage 4.
        try:
            storage.ensure_bucket(cloud, settings.cloud.bucket, create=settings.cloud.emulated)
        except Exception as err:  # noqa: BLE001
            return [f"cloud bucket: {err}"]
        return []

    # The checks wait on the network, so they run side by side, each started as soon as it can be:
    # the clients are built here meanwhile (one boto3 session builds one client at a time).
    # Problems are reported in this order.
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="preflight") as pool:
        found = {"api": [pool.submit(api, stage) for stage in registry.needing("api", stages)]}
        if registry.needing("db", stages):
            found["db"] = [pool.submit(database)]
        if registry.needing("store", stages):
            found["store"] = [pool.submit(store, storage.client(settings.store))]
        if registry.needing("cloud", stages):
            found["cloud"] = [pool.submit(cloud_bucket, storage.cloud_client(settings.cloud))]
        return [problem for service in registry.SERVICES for future in found.get(service, [])
                for problem in future.result()]


def expected_payload(settings: config.Settings, run_id: str | None = None) -> int:
    """About how many bytes a run's raw payload takes, for the free-space checks: what stage 1 of
    `run_id` wrote, else what the latest run's stage 1 wrote, else the bundled snapshot's size."""
    ingest = registry.writer_of(registry.Layer.RAW).name
    for candidate in (run_id, runs.latest_run_id(settings)):
        record = runs.read_stage(settings, candidate, ingest) if candidate else None
        sizes = [a.get("size") or 0 for a in (record or {}).get("artifacts", [])]
        if sizes:
            return max(sizes)
    return len(source.snapshot_bytes())


# --- executing notebooks ----------------------------------------------------------------------------

class Interrupted(Exception):
    """SIGTERM or SIGINT reached the runner: how a run is stopped, not an error the pipeline found
    (so not a PipelineError; it ends the run as `interrupted`, exit 130)."""


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def failed_cell(err: Exception) -> str:
    """'cell [7]: ValueError: ...' from a papermill error, or the error itself."""
    papermill = import_papermill()

    if isinstance(err, papermill.PapermillExecutionError):
        return f"cell [{err.exec_count}]: {err.ename}: {err.evalue}"
    return f"{type(err).__name__}: {err}"


ENGINE = "medallion"


def import_papermill():
    """papermill, without the ~2 s nbformat pays for jsonschema's IRI format checker: jsonschema builds
    an RFC 3987 grammar at import (rfc3987_syntax) for a string format no notebook schema uses; and
    without pyarrow, which papermill imports for its HDFS paths (~80 MiB of the runner's memory for
    the whole run; the runner reads and writes local notebooks only)."""
    if "jsonschema" not in sys.modules and "rfc3987_syntax" not in sys.modules:
        sys.modules["rfc3987_syntax"] = None  # jsonschema treats it as not installed
        try:
            import jsonschema  # noqa: F401
        finally:
            del sys.modules["rfc3987_syntax"]
    if "papermill" not in sys.modules and "pyarrow" not in sys.modules:
        sys.modules["pyarrow"] = None  # papermill treats it as not installed (hdfs:// paths unsupported)
        try:
            import papermill.iorw  # noqa: F401
        finally:
            del sys.modules["pyarrow"]  # anything else may still import it
    import papermill

    return papermill


def parse_parameters(pairs: list[str], stages: list[str]) -> dict[str, dict]:
    """-p KEY=VALUE pairs → {stage: {key: value}}, typed and checked as each chosen stage declares
    (lib/stages/parameters.py)."""
    known = {s: {name: p.type_name for name, p in parameters.declared(s).items()} for s in stages}
    return params.parse(pairs, known, parameters.check)


def _engine_on_warm_kernel() -> str:
    """The name of a papermill engine that runs on a started kernel: `_warm_engine` itself, or, when
    another engine is the default (lib/progress.py wraps nbclient's), that engine on top of it."""
    from papermill.engines import papermill_engines

    global _WARM
    if _WARM is None:
        _WARM = _warm_engine()
    default = papermill_engines.get_engine(None)
    engine = _WARM if issubclass(_WARM, default) else type(f"Warm{default.__name__}", (default, _WARM), {})
    name = f"{ENGINE}-{default.__module__}.{default.__name__}"
    if name not in papermill_engines._engines:
        papermill_engines.register(name, engine)
    return name


_WARM = None


# IPython's reset ends with a full garbage collection, which went through every object the imports of
# pandas, pyarrow, pandera and matplotlib built (0.1-0.3 s a stage). Those objects (and the last
# notebook's, which the reset then frees by their reference counts) are set aside for that collection
# only (gc.freeze), then handed back: frozen for good, they would leave the collector so few long-lived
# objects that it went through everything a large stage holds far more often (stage 2: +20%).
# Then what the last notebook freed is handed back to the system (lib/memory.py
# `release`), so that a stage starts from the kernel's own size, not the last stage's peak.
RESET = ("__import__('gc').freeze(); get_ipython().reset(new_session=True); __import__('gc').unfreeze(); "
         "__import__('lib.memory', fromlist=['release']).release()")
SAVE_EVERY_S = 1.0


async def _until_ready(kc, timeout: float) -> None:
    """jupyter_client's `wait_for_ready` less its last step: the kernel has answered kernel_info and
    IOPub delivers (a status message arrives), but IOPub is not then drained until it has been quiet
    for 0.2 s, which added 0.2 s to every kernel start. What stays on IOPub is kernel_info's and the
    start-up's; nbclient takes each cell's outputs by the cell's own request id."""
    from jupyter_core.utils import ensure_async

    deadline = time.monotonic() + timeout
    while True:
        kc.kernel_info()
        try:
            reply = await ensure_async(kc.shell_channel.get_msg(timeout=1))
        except Empty:
            reply = None
        if reply is not None and reply["msg_type"] == "kernel_info_reply":
            try:
                await ensure_async(kc.iopub_channel.get_msg(timeout=0.2))
            except Empty:  # not subscribed yet: ask again
                pass
            else:
                getattr(kc, "_handle_kernel_info_reply", lambda _: None)(reply)  # protocol version
                return
        if not await ensure_async(kc.is_alive()):
            raise RuntimeError("Kernel died before replying to kernel_info")
        if time.monotonic() > deadline:
            raise RuntimeError(f"Kernel didn't respond in {timeout:.0f} seconds")


def _warm_engine():
    """papermill's nbclient engine on a kernel started beforehand (lib/kernels.py `Kernels`): before
    the notebook's first cell the kernel's namespace, history and execution count are reset, so the
    notebook runs as on a new kernel; the kernel stays up for the next stage. Parameter injection,
    saving after each cell and the partial notebook on failure stay papermill's."""
    from jupyter_core.utils import ensure_async, run_sync
    from nbclient.util import run_hook
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine
    from papermill.log import logger

    class ResetClient(PapermillNotebookClient):
        kernels = None  # the runner's Kernels: its connected client is used again by every stage

        async def async_start_new_kernel_client(self):
            kc = self.kernels.kc if self.kernels is not None else None
            if kc is None:
                # nbclient's own start of a client, but for the readiness check (_until_ready).
                self.kc = kc = self.km.client()
                await ensure_async(kc.start_channels())
                try:
                    await _until_ready(kc, self.startup_timeout)
                except Exception:
                    await self._async_cleanup_kernel()
                    raise
                kc.allow_stdin = False
                await run_hook(self.on_notebook_start, notebook=self.nb)
                if self.kernels is not None:
                    self.kernels.kc = kc
            else:
                # Connected and answering since the first stage: no new channels, no kernel_info
                # handshake (each costs a few hundred ms of waiting on the kernel's IOPub).
                self.kc = kc
                kc.allow_stdin = False
                await run_hook(self.on_notebook_start, notebook=self.nb)
            reply = await self.async_wait_for_reply(kc.execute(RESET, silent=True, store_history=False))
            if (reply or {}).get("content", {}).get("status") != "ok":
                raise RuntimeError(f"could not reset the kernel before the notebook: {reply}")
            return kc

        start_new_kernel_client = run_sync(async_start_new_kernel_client)  # what setup_kernel calls

    class WarmEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None,
                                     stderr_file=None, start_timeout=60, execution_timeout=None, km=None,
                                     kernels=None, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("input_path", "timeout", "startup_timeout")}
            client = ResetClient(
                nb_man, km=km, timeout=execution_timeout, startup_timeout=start_timeout,
                kernel_name=kernel_name, log=logger, log_output=log_output, stdout_file=stdout_file,
                stderr_file=stderr_file, **kwargs)
            client.kernels = kernels
            # papermill writes (and validates) the whole notebook as each cell starts and again as it
            # ends; at most one such save a second is kept. The first save (as the stage starts), the
            # save after a failure and the final one are papermill's own, unthrottled.
            save, last = nb_man.save, [time.monotonic()]

            def throttled(**kw):
                if time.monotonic() - last[0] >= SAVE_EVERY_S:
                    save(**kw)
                    last[0] = time.monotonic()

            nb_man.save = throttled
            try:
                return client.execute(cleanup_kc=False)
            finally:
                nb_man.save = save
                if client.kc is not None and (kernels is None or kernels.kc is not client.kc):
                    client.kc.stop_channels()

    return WarmEngine


class WholeNotebooks:
    """papermill's handler of local paths, but every save of an executed notebook is written whole
    (lib/files.py): a save that fails (a full disk) leaves the last complete notebook, never half of
    one, and no temporary file. Registered for the run folders the runner writes into."""

    def __init__(self, local):
        self.local = local

    def read(self, path):
        return self.local.read(path)

    def listdir(self, path):
        return self.local.listdir(path)

    def write(self, buf, path):
        files.write(Path(path), buf)

    def pretty_path(self, path):
        return path

    def cwd(self, new_path):
        return self.local.cwd(new_path)


_WHOLE = set()


def _write_whole(papermill, folder: Path) -> None:
    prefix = f"{folder}{os.sep}"
    if prefix not in _WHOLE:
        io = papermill.iorw.papermill_io
        io.register(prefix, WholeNotebooks(io.get_handler("local.ipynb")))
        _WHOLE.add(prefix)


def execute(record: runs.RunRecord, stage: str, params: dict, *, kernel: str, start_timeout: int,
            cell_timeout: int, kernels: kernels_.Kernels | None = None) -> None:
    papermill = import_papermill()
    _write_whole(papermill, record.dir)

    warm = {}
    if kernels is not None:
        km = kernels.take()
        if km is not None:
            warm = {"engine_name": _engine_on_warm_kernel(), "km": km, "kernels": kernels}
    # An earlier execution's record and notebook become an attempt; the new record names the kernel.
    record.stage_started(stage, kernels.process() if warm else None)
    lineage.stage_started(record, stage)  # OpenLineage START (never raises)
    started = time.monotonic()
    output = record.dir / f"{stage}.ipynb"
    log.info("stage %s: running %s", stage, output)
    # The kernel inherits this: it tells `context.begin` that the runner owns the run's record.
    saved = os.environ.get(runs.RUNNER_ENV)
    os.environ[runs.RUNNER_ENV] = record.run_id
    try:
        papermill.execute_notebook(
            str(registry.get(stage).notebook), str(output),
            parameters={"run_id": record.run_id, **params},
            kernel_name=kernel, start_timeout=start_timeout, execution_timeout=cell_timeout,
            cwd=str(config.ROOT), progress_bar=False, log_output=False, request_save_on_cell_execute=True,
            extra_arguments=kernels_.KERNEL_ARGUMENTS, **warm,
        )
    except Interrupted:
        _ended(record, stage, "interrupted", time.monotonic() - started, "interrupted")
        raise
    except BaseException as err:
        _ended(record, stage, "failed", time.monotonic() - started, failed_cell(err))
        raise
    finally:
        if saved is None:
            os.environ.pop(runs.RUNNER_ENV, None)
        else:
            os.environ[runs.RUNNER_ENV] = saved
    _ended(record, stage, "succeeded", time.monotonic() - started)


def _ended(record: runs.RunRecord, stage: str, status: str, seconds: float, error: str | None = None) -> None:
    """The runner's verdict in the stage record, then OpenLineage COMPLETE, FAIL or ABORT, then the
    ended execution into the records bucket, in the background while the next stage runs (never
    raises: a store that cannot take it now is told again at the next push, and a publish requires
    it). The run as a whole is stored as it starts and as it ends (run_pipeline.py), once the
    pushes queued here are done."""
    record.stage_ended(stage, status, seconds, error)
    lineage.stage_ended(record, stage)
    record_store.push_soon(record.settings, record.run_id)


def settle_side_channels(record: runs.RunRecord | None) -> list[dict]:
    """The end of a run: its lineage events and alerts still on their way are waited for, all
    together at most `outbox.BUDGET_S`, then given up on. What became of each destination goes into
    the record, under `side_channels` (one entry per destination and invocation), and the log."""
    outcomes = [{**o.record(), "at": runs.now()} for o in outbox.flush_all()]
    if record is not None and outcomes:
        record.data.setdefault("side_channels", []).extend(outcomes)
        record.save()
    return outcomes


def summary_line(stage: str, entry: dict) -> str:
    """One line of a run's end: status, time, rows, the first object or the error, escaped for the
    terminal (lib/terminal.py)."""
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
    return terminal.safe(text)


def ensure_stack(env: dict[str, str]) -> None:
    """Start the embedded services this configuration relies on (a running one is reused)."""
    needed = tuple(s for s, embedded in (("object_store", config.uses_embedded_store(env)),
                                         ("database", config.uses_embedded_db(env))) if embedded)
    if needed:
        stack.up(config.state_dir(env), needed)


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)

