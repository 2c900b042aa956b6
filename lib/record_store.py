"""Run records in the object store: written once, read from any machine that reaches the store.

`outputs/runs/<run id>/` is this machine's working copy of a run's record (lib/runs.py). The record
itself lives in the records bucket (`RECORDS_BUCKET`, default `records`) of the object store the
stages write to, under `runs/<run id>/`, so that a run whose stages ran on several workers (Airflow
with a Celery or Kubernetes executor, containers, two checkouts) keeps one record:

- `stages/<stage>.attempt<N>.json`: execution N (1, 2, …) of a stage, written once it ended, with its
  executed notebook `notebooks/<stage>.attempt<N>.ipynb` and the notebook's page
  `pages/<stage>.attempt<N>.html`. The highest N is the stage's latest attempt;
- `versions/<NNNNNN>-<status>/` (its number claimed by `claims/<NNNNNN>`): the run as a whole each time it was saved (the manifest, the report
  and quarantine pages, the OpenLineage events file, what it published), named with the run's status
  then; the highest is the latest. A listing alone tells which runs are still `running`.

Every object is written with `If-None-Match: *`: the store itself refuses to rewrite one. A new
attempt or a new version is a new object; nothing is overwritten or deleted.

`push` stores what a run wrote here and the store lacks; `pull` brings a run's record from the store
into the working copy: the attempts this machine lacks, and the latest version when it is newer than
the one this copy was last in step with (`.stored` in the run folder). `pull_all` brings every run
(`runs`, `report`, `diff`); a run brings only what it works with (`pull_for_run`): its own record,
the run it reads, and the runs recorded as still running, which the sweep under the lock looks at. Locally the latest attempt of
a stage keeps its usual names (`stages/<stage>.json`, `<stage>.ipynb`), earlier ones their
`.attemptN` names, so everything that reads the working copy reads a pulled run like its own.
A stage record still `running` stays local: only an ended execution is stored.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import botocore.exceptions

from lib import config, files, names, registry, runs, storage

log = logging.getLogger(__name__)

PREFIX = "runs"
FILES_META = "files"  # a version's manifest names the version's other files in this metadata
STATE_FILE = ".stored"  # in a run folder: the version this copy is in step with, and its files' digests
KINDS = {"stages": ".json", "notebooks": ".ipynb", "pages": ".html"}  # an attempt's objects → local suffix
_ATTEMPT = re.compile(r"^(stages|notebooks|pages)/(?P<stage>[0-9A-Za-z_]+)\.attempt(?P<n>[1-9][0-9]*)\.(json|ipynb|html)$")
_VERSION = re.compile(r"^versions/(?P<dir>(?P<v>[0-9]{6})-(?P<status>[a-z]+))/(?P<name>[^/]+)$")


class RecordStoreError(storage.StorageError):
    """The records bucket could not be read or written; the message names the run and the cause."""


def run_prefix(run_id: str) -> str:
    return f"{PREFIX}/{names.run_id(run_id)}/"


def where(settings: config.Settings, run_id: str | None = None) -> str:
    """`s3://records/runs/<run id>/`, as messages name a run's stored record."""
    return f"s3://{settings.records_bucket}/{run_prefix(run_id) if run_id else PREFIX + '/'}"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the working copy, as store keys -------------------------------------------------------------------

def _local(run_dir: Path, kind: str, stage: str, n: int, current: bool) -> Path:
    """Where attempt `n` of a stage's `kind` object lives in the working copy."""
    name = f"{stage}{KINDS[kind]}" if current else f"{stage}.attempt{n}{KINDS[kind]}"
    return run_dir / "stages" / name if kind == "stages" else run_dir / name


def _attempt_key(kind: str, stage: str, n: int) -> str:
    return f"{kind}/{stage}.attempt{n}{KINDS[kind]}"


def stage_key(run_id: str, stage: str, n: int) -> str:
    """The key of attempt `n` of a stage's record in the records bucket."""
    return run_prefix(run_id) + _attempt_key("stages", registry.get(stage).name, n)


def _attempts_here(run_dir: Path, stage: str) -> tuple[list[int], int | None, dict | None]:
    """(the numbers of the stage's earlier attempts in the working copy, the number of its current
    record or None, that record)."""
    earlier = [int(p.name[len(stage) + len(".attempt"):-len(".json")])
               for p in runs.attempt_paths(run_dir.parent.parent, run_dir.name, stage)]
    current = runs.read_json(run_dir / "stages" / f"{stage}.json")
    return earlier, (len(earlier) + 1 if current is not None else None), current


def ended_attempts(run_dir: Path) -> dict[str, Path]:
    """Store key → local file, for every stage execution of the working copy that has ended (its
    record, executed notebook and page, those it has)."""
    out = {}
    for stage in registry.NAMES:
        earlier, current_n, current = _attempts_here(run_dir, stage)
        numbers = [(n, False) for n in earlier]
        if current_n is not None and current.get("status") != "running":
            numbers.append((current_n, True))
        for n, is_current in numbers:
            for kind in KINDS:
                path = _local(run_dir, kind, stage, n, is_current)
                if path.is_file():
                    out[_attempt_key(kind, stage, n)] = path
    return out


def run_files(run_dir: Path) -> dict[str, Path]:
    """The run-level files of the working copy (manifest, pages of the run, events, …): every file at
    the top of the run folder that is not a stage's notebook or page, nor hidden."""
    stage_files = re.compile(rf"^({'|'.join(map(re.escape, registry.NAMES))})(\.attempt[0-9]+)?\.(ipynb|html)$")
    return {p.name: p for p in sorted(run_dir.iterdir())
            if p.is_file() and not p.name.startswith(".") and not stage_files.match(p.name)} if run_dir.is_dir() else {}


def _state(settings: config.Settings, run_dir: Path) -> dict:
    """What `.stored` says, when it speaks of this store's records bucket (a copy in step with another
    bucket, RECORDS_BUCKET changed, is not in step with this one)."""
    found = runs.read_json(run_dir / STATE_FILE)
    if isinstance(found, dict) and found.get("store") == _store_of(settings):
        return found
    return {"version": 0, "files": {}}


def _store_of(settings: config.Settings) -> str:
    return f"{settings.store.url}/{settings.records_bucket}"


def _save_state(settings: config.Settings, run_dir: Path, version: int, digests: dict[str, str],
                seen: int | None = None) -> None:
    """`seen`: how many objects of the run the store held when this copy was last in step with it
    (`pull_all` skips a run whose count is unchanged). Written only when it changes."""
    state = {"store": _store_of(settings), "version": version, "files": digests, "seen": seen}
    if _state(settings, run_dir) != state:
        runs.write_json(run_dir / STATE_FILE, state)


# --- the store -----------------------------------------------------------------------------------------

@dataclass
class Stored:
    """What the store holds of one run: attempt keys, and the version number → its file names."""

    keys: dict[str, dict]  # relative key → listed object (size, last_modified)

    @property
    def versions(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for key in self.keys:
            if m := _VERSION.match(key):
                out.setdefault(int(m["v"]), []).append(m["name"])
        return out

    def folder(self, version: int) -> str:
        """`versions/<NNNNNN>-<status>`"""
        return next(f"versions/{m['dir']}" for key in self.keys if (m := _VERSION.match(key)) and int(m["v"]) == version)

    @property
    def latest(self) -> int:
        return max(self.versions, default=0)

    @property
    def status(self) -> str | None:
        """The run's status when its latest version was stored."""
        return self.folder(self.latest).rsplit("-", 1)[1] if self.latest else None

    def attempts(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for key in self.keys:
            if (m := _ATTEMPT.match(key)) and key.startswith("stages/") and m["stage"] in registry.NAMES:
                out.setdefault(m["stage"], []).append(int(m["n"]))
        return {stage: sorted(ns) for stage, ns in out.items()}


def _client(settings: config.Settings):
    s3 = storage.client(settings.store)
    storage.ensure_bucket(s3, settings.records_bucket)
    return s3


def _list(s3, settings: config.Settings, run_id: str | None = None) -> dict[str, Stored]:
    """run id → what the store holds of it (one run, or all of them)."""
    prefix = run_prefix(run_id) if run_id else f"{PREFIX}/"
    out: dict[str, Stored] = {}
    for obj in storage.list_objects(s3, settings.records_bucket, prefix):
        rest = obj["key"][len(PREFIX) + 1:]
        rid, _, key = rest.partition("/")
        if names.RUN_ID.match(rid) and key:
            out.setdefault(rid, Stored({})).keys[key] = obj
    return out


def _put_once(s3, bucket: str, key: str, data: bytes, metadata: dict) -> bool:
    """Write an object that must not exist yet; False when it does (the store refused the rewrite)."""
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*", ContentType=_content_type(key),
                      Metadata={k: str(v) for k, v in metadata.items()})
    except botocore.exceptions.ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return False
        raise RecordStoreError(f"writing s3://{bucket}/{key}: {err}") from None
    except botocore.exceptions.BotoCoreError as err:
        raise RecordStoreError(f"writing s3://{bucket}/{key}: {err}") from None
    return True


def _content_type(key: str) -> str:
    return {".json": "application/json", ".html": "text/html; charset=utf-8",
            ".ipynb": "application/x-ipynb+json"}.get(Path(key).suffix, "application/octet-stream")


def _get(s3, bucket: str, key: str) -> bytes:
    return storage.get_bytes(s3, bucket, key)[0]


# --- push ----------------------------------------------------------------------------------------------

_background: ThreadPoolExecutor | None = None
_queued: list[Future] = []


def push_soon(settings: config.Settings, run_id: str) -> None:
    """`push` the run's ended stage executions (no new version) in the background, while the run goes
    on: one push at a time, in the order asked. Every `push` waits for them first (`settle`), and
    so does the process's exit."""
    global _background
    if _background is None:
        _background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="record-push")
        atexit.register(settle)
    _queued.append(_background.submit(_push, settings, run_id, False, False))


def settle() -> None:
    """Wait for the pushes `push_soon` queued (each logs its own failure: the next push stores it)."""
    while _queued:
        _queued.pop(0).result()


def push(settings: config.Settings, run_id: str, strict: bool = False, version: bool = True) -> bool:
    """Store what the working copy of a run holds and the store lacks: each ended stage execution,
    and (`version`) a new version when the run-level files changed since the copy was last in step.
    Returns whether it was stored. `strict`: a store that cannot take it raises RecordStoreError
    (before a publish); otherwise it is logged, and the next push or `runs` stores it. Pushes
    queued by `push_soon` are done first."""
    settle()
    return _push(settings, run_id, strict, version)


def _push(settings: config.Settings, run_id: str, strict: bool, version: bool) -> bool:
    run_dir = runs.run_dir(settings, run_id)
    if not (run_dir / "manifest.json").is_file():
        return True
    try:
        s3 = _client(settings)
        stored = _list(s3, settings, run_id).get(run_id, Stored({}))
        prefix = run_prefix(run_id)
        meta = {"run-id": run_id}
        written = 0
        for key, path in ended_attempts(run_dir).items():
            if key not in stored.keys:
                written += _put_once(s3, settings.records_bucket, prefix + key, path.read_bytes(), meta)
        written += _push_version(s3, settings, run_id, run_dir, stored) if version else 0
        state = _state(settings, run_dir)
        if state.get("version") and state["version"] >= stored.latest:  # in step: `pull_all` may skip it
            _save_state(settings, run_dir, state["version"], state.get("files", {}), len(stored.keys) + written)
    except (storage.StorageError, OSError) as err:
        message = f"the record of run {run_id} could not be stored in {where(settings, run_id)}: {err}"
        if strict:
            raise RecordStoreError(message) from None
        log.warning("%s; it is kept in %s and stored by the next push", message, run_dir)
        return False
    return True


def _push_version(s3, settings: config.Settings, run_id: str, run_dir: Path, stored: Stored) -> int:
    """A new version when the run-level files changed since the working copy was last in step; returns
    how many objects it wrote. Its number is claimed first (`claims/NNNNNN`: the store refuses a claim
    another writer made, and the next number is tried); then the manifest, which names the version's
    other files, so a reader takes a version only once they are all there (`complete`)."""
    state = _state(settings, run_dir)
    bodies = {name: path.read_bytes() for name, path in run_files(run_dir).items()}
    digests = {name: _digest(body) for name, body in bodies.items()}
    if "manifest.json" not in bodies or digests == state.get("files"):
        return 0  # nothing changed here since this copy was last in step (whoever stored later)
    others = sorted(set(bodies) - {"manifest.json"})
    status = _status(bodies["manifest.json"])
    version = stored.latest + 1
    while not _put_once(s3, settings.records_bucket, f"{run_prefix(run_id)}claims/{version:06d}", b"", {"run-id": run_id}):
        version += 1  # another writer took this number meanwhile: the next one
    _put_once(s3, settings.records_bucket, _version_key(run_id, f"{version:06d}-{status}", "manifest.json"),
              bodies["manifest.json"], {"run-id": run_id, FILES_META: " ".join(others)})
    for name in others:
        _put_once(s3, settings.records_bucket, _version_key(run_id, f"{version:06d}-{status}", name), bodies[name],
                  {"run-id": run_id})
    _save_state(settings, run_dir, version, digests)
    return 2 + len(others)


def _status(manifest: bytes) -> str:
    try:
        found = str(json.loads(manifest).get("status") or "unknown")
    except (ValueError, AttributeError):
        return "unknown"
    return found if re.fullmatch(r"[a-z]+", found) else "unknown"


def _version_key(run_id: str, folder: str, name: str) -> str:
    """`folder`: `NNNNNN-<status>`, or `versions/NNNNNN-<status>` as `Stored.folder` gives it."""
    return f"{run_prefix(run_id)}versions/{folder.removeprefix('versions/')}/{name}"


def complete(s3, settings: config.Settings, run_id: str, stored: Stored) -> int:
    """The latest version of a run whose files are all stored (0: none)."""
    for version in sorted(stored.versions, reverse=True):
        listed = stored.versions[version]
        if "manifest.json" not in listed:
            continue
        found = storage.head(s3, settings.records_bucket, _version_key(run_id, stored.folder(version), "manifest.json"))
        wanted = set((found or {}).get("metadata", {}).get(FILES_META, "").split())
        if found is not None and wanted <= set(listed):
            return version
    return 0


# --- pull ----------------------------------------------------------------------------------------------

def pull(settings: config.Settings, run_id: str) -> bool:
    """Bring one run's record from the store into the working copy; True when the store has it."""
    s3 = _client(settings)
    stored = _list(s3, settings, run_id).get(run_id)
    if stored is None:
        return False
    _pull_run(s3, settings, run_id, stored)
    return True


def pull_all(settings: config.Settings) -> list[str]:
    """Bring every stored run's record into the working copy; returns the runs that changed here."""
    s3 = _client(settings)
    changed = []
    for run_id, stored in sorted(_list(s3, settings).items()):
        if _state(settings, runs.run_dir(settings, run_id)).get("seen") == len(stored.keys):
            continue  # nothing was stored since this copy was last in step
        if _pull_run(s3, settings, run_id, stored):
            changed.append(run_id)
    return changed


def pull_for_run(settings: config.Settings, run_ids: list[str]) -> None:
    """What a run holding the lock works with: the records of `run_ids` (its own, the run it reads),
    and of every run whose latest stored version says it is still running (the sweep decides
    whether it is over). Nothing else is brought: a worker keeps no copy it does not use."""
    s3 = _client(settings)
    for run_id, stored in sorted(_list(s3, settings).items()):
        if run_id in run_ids or stored.status == "running":
            _pull_run(s3, settings, run_id, stored)


def sync_all(settings: config.Settings) -> list[str]:
    """`pull_all`, then `push` every run of the working copy the store lacks or is behind on (one
    whose push failed while the store was away, or recorded before records were stored)."""
    changed = pull_all(settings)
    base = runs.runs_dir(settings)
    for run_dir in sorted(base.iterdir()) if base.is_dir() else []:
        if run_dir.is_dir() and names.RUN_ID.match(run_dir.name) and _behind_here(settings, run_dir):
            push(settings, run_dir.name)
    return changed


def _behind_here(settings: config.Settings, run_dir: Path) -> bool:
    """Whether the working copy holds run-level files the store has not got (cheap: digests only)."""
    if not (run_dir / "manifest.json").is_file():
        return False
    state = _state(settings, run_dir)
    return {n: _digest(p.read_bytes()) for n, p in run_files(run_dir).items()} != state.get("files")


def _write(path: Path, data: bytes, when=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write(path, data)
    if when is not None:  # as old as the stored object: idle times (lib/endings.py) count from its write
        os.utime(path, (when.timestamp(), when.timestamp()))


def _as_attempt(record: dict, stage: str, n: int) -> bytes:
    """A stage record as the working copy keeps an earlier attempt: its notebook renamed as
    `keep_attempt` renames it."""
    if record.get("notebook") == f"{stage}.ipynb":
        record = {**record, "notebook": f"{stage}.attempt{n}.ipynb"}
    return runs.json_bytes(record)


def _pull_run(s3, settings: config.Settings, run_id: str, stored: Stored) -> bool:
    run_dir = runs.run_dir(settings, run_id)
    prefix = run_prefix(run_id)
    bucket = settings.records_bucket
    changed = False
    for stage, numbers in stored.attempts().items():
        earlier, current_n, current = _attempts_here(run_dir, stage)
        newest = numbers[-1]
        here_is_newer = current_n is not None and current_n > newest
        if current_n is not None and current_n < newest:
            # The working copy's current execution is an earlier attempt than the store's latest:
            # it becomes that attempt (from the store when it has it), its notebook and page too.
            for kind in ("notebooks", "pages"):
                path = _local(run_dir, kind, stage, current_n, True)
                if path.exists():
                    path.replace(_local(run_dir, kind, stage, current_n, False))
            if current_n not in numbers:
                _write(_local(run_dir, "stages", stage, current_n, False), _as_attempt(current, stage, current_n))
            (run_dir / "stages" / f"{stage}.json").unlink(missing_ok=True)
            changed = True
        for n in numbers:
            is_current = n == newest and not here_is_newer
            for kind in KINDS:
                key = _attempt_key(kind, stage, n)
                if key not in stored.keys:
                    continue
                path = _local(run_dir, kind, stage, n, is_current)
                if kind == "stages":
                    body = _get(s3, bucket, prefix + key)
                    body = body if is_current else _as_attempt(json.loads(body), stage, n)
                    if path.exists() and path.read_bytes() == body:
                        continue
                    if is_current and current is not None and current.get("status") == "running" \
                            and current_n == n and runs.process_alive(current.get("process")):
                        continue  # being written here right now
                    _write(path, body, stored.keys[key]["last_modified"])
                    changed = True
                elif not path.exists():
                    _write(path, _get(s3, bucket, prefix + key), stored.keys[key]["last_modified"])
                    changed = True
    if stored.latest > _state(settings, run_dir).get("version", 0):
        latest = complete(s3, settings, run_id, stored)
        if latest > _state(settings, run_dir).get("version", 0):
            digests = {}
            for name in stored.versions[latest]:
                key = _version_key(run_id, stored.folder(latest), name)
                body = _get(s3, bucket, key)
                _write(run_dir / name, body, stored.keys[key[len(prefix):]]["last_modified"])
                digests[name] = _digest(body)
            _save_state(settings, run_dir, latest, digests)
            changed = True
    state = _state(settings, run_dir)
    if run_dir.is_dir() and state.get("version") == stored.latest:
        _save_state(settings, run_dir, state["version"], state.get("files", {}), len(stored.keys))
    return changed
