"""Object storage through boto3: the local store (SeaweedFS or MinIO) and the cloud role (AWS S3 or an
S3-compatible endpoint) share these functions. Every object carries metadata: run id, stage, rows and
the sha256 of its content."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import queue
import random
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

import boto3
import boto3.s3.transfer
import botocore.config
import botocore.session
import botocore.exceptions

from lib import names
from lib.config import Cloud, ObjectStore
from lib.errors import PipelineError

log = logging.getLogger(__name__)

# Every call is tried at most ATTEMPTS times: botocore's "standard" mode retries a call (read, write,
# listing) that could not connect or was answered 500, 502, 503, 504 or throttled, with exponential
# backoff and jitter. A body that breaks off after its answer began is ResumingBody's to retry.
ATTEMPTS = 6
CLIENT_CONFIG = dict(
    signature_version="s3v4",
    s3={"addressing_style": "path"},
    connect_timeout=5,
    read_timeout=60,
)
# For a caller that polls (the embedded stack waiting for its store): one try, short timeouts.
PROBE_TIMEOUTS = {"connect_timeout": 2, "read_timeout": 5}


def client_config(probe: bool = False) -> botocore.config.Config:
    # A new retries dict each time: botocore rewrites the one it is given.
    retries = {"mode": "standard", "total_max_attempts": 1 if probe else ATTEMPTS}
    return botocore.config.Config(**{**CLIENT_CONFIG, **(PROBE_TIMEOUTS if probe else {})}, retries=retries)


# What reading an answer's body raises when the connection breaks off or stalls part-way.
BODY_ERRORS = (botocore.exceptions.ResponseStreamingError, botocore.exceptions.ReadTimeoutError,
               botocore.exceptions.IncompleteReadError, botocore.exceptions.ConnectionClosedError)


class StorageError(PipelineError):
    """An object store call failed; the message names the endpoint and bucket, never credentials."""


@dataclass
class Artifact:
    bucket: str
    key: str
    size: int
    sha256: str
    rows: int | None = None
    inputs: list[str] = field(default_factory=list)
    role: str = "local"  # "local" or "cloud"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def to_dict(self) -> dict:
        return {**asdict(self), "uri": self.uri}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# One boto3 Session per profile (building one loads botocore's service models, ~0.1 s of CPU), all of
# them reading the models through one loader, which parses each once; one client per set of settings:
# clients are thread-safe and every stage asks for the same few.
_SESSIONS: dict[str | None, boto3.session.Session] = {}
# A session makes one client at a time (boto3's sessions are not thread-safe; its clients are): the
# records are pushed from a thread of their own while the run goes on (lib/record_store.py `push_soon`).
_MAKING = threading.Lock()


def _session(profile: str | None = None) -> boto3.session.Session:
    if profile not in _SESSIONS:
        core = botocore.session.get_session()
        if _SESSIONS:  # the models the first session parsed
            core.register_component("data_loader", next(iter(_SESSIONS.values()))._loader)
        _SESSIONS[profile] = boto3.session.Session(botocore_session=core, profile_name=profile)
    return _SESSIONS[profile]


@functools.lru_cache(maxsize=16)
def client(store: ObjectStore, probe: bool = False):
    """The client of a store; `probe`: one try per call with short timeouts, for a caller that polls."""
    with _MAKING:
        return _session().client(
            "s3",
            endpoint_url=store.url,
            aws_access_key_id=store.access_key.reveal(),
            aws_secret_access_key=store.secret_key.reveal(),
            region_name=store.region,
            config=client_config(probe),
        )


@functools.lru_cache(maxsize=16)
def cloud_client(cloud: Cloud):
    """The cloud role: explicit keys when configured, otherwise boto3's own chain (environment,
    AWS_PROFILE including SSO profiles)."""
    keys = {}
    if cloud.access_key is not None:
        keys = {"aws_access_key_id": cloud.access_key.reveal(),
                "aws_secret_access_key": cloud.secret_key.reveal()}
        if cloud.session_token:
            keys["aws_session_token"] = cloud.session_token.reveal()
    with _MAKING:
        return _session(cloud.profile).client("s3", endpoint_url=cloud.endpoint_url, region_name=cloud.region,
                                              config=client_config(), **keys)


def endpoint(s3) -> str:
    return s3.meta.endpoint_url


def _fail(s3, action: str, bucket: str, err: Exception) -> StorageError:
    if isinstance(err, botocore.exceptions.ClientError):
        code = err.response.get("Error", {}).get("Code", "?")
        detail = f"{code}: {err.response.get('Error', {}).get('Message', '')}".strip()
    elif isinstance(err, botocore.exceptions.EndpointConnectionError):
        detail = "the object store is not answering (is it running?)"
    else:
        detail = f"{type(err).__name__}: {err}"
    return StorageError(f"{action} failed on {endpoint(s3)} bucket {bucket!r}: {detail}")


def check(s3) -> None:
    """Raise StorageError naming the endpoint when the store does not answer or refuses the keys."""
    try:
        s3.list_buckets()
    except Exception as err:  # noqa: BLE001 - any failure, reported with the endpoint as one line
        raise _fail(s3, "listing buckets", "-", err) from None


def round_trip(s3, bucket: str) -> None:
    """Write a small object to `bucket` (created if missing), read it back and delete it: proof that
    the store serves, not only answers. Raises StorageError naming the step that failed."""
    key, data = f"ready/{uuid.uuid4().hex}", uuid.uuid4().bytes
    ensure_bucket(s3, bucket)
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
        raise _fail(s3, f"writing {key}", bucket, err) from None
    read, _ = get_bytes(s3, bucket, key)
    if read != data:
        raise StorageError(f"reading {key} on {endpoint(s3)} bucket {bucket!r} gave other bytes than were written")
    delete(s3, bucket, key)


def ensure_bucket(s3, bucket: str, create: bool = True) -> None:
    names.bucket(bucket)
    try:
        s3.head_bucket(Bucket=bucket)
        return
    except botocore.exceptions.ClientError as err:
        if err.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise _fail(s3, "checking the bucket", bucket, err) from None
    except botocore.exceptions.BotoCoreError as err:
        raise _fail(s3, "checking the bucket", bucket, err) from None
    if not create:
        raise StorageError(f"bucket {bucket!r} does not exist on {endpoint(s3)}")
    try:
        s3.create_bucket(Bucket=bucket)
        log.info("created bucket %s on %s", bucket, endpoint(s3))
    except botocore.exceptions.ClientError as err:
        if err.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise _fail(s3, "creating the bucket", bucket, err) from None
    except botocore.exceptions.BotoCoreError as err:
        raise _fail(s3, "creating the bucket", bucket, err) from None


def _metadata(meta: dict) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in meta.items() if v is not None}


def put_bytes(s3, bucket: str, key: str, data: bytes, *, metadata: dict, content_type: str,
              rows: int | None = None, inputs: list[str] = (), role: str = "local") -> Artifact:
    digest = sha256(data)
    meta = _metadata({**metadata, "sha256": digest, "rows": rows})
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=data, Metadata=meta, ContentType=content_type)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
        raise _fail(s3, f"writing {key}", bucket, err) from None
    log.info("wrote s3://%s/%s (%d bytes, sha256 %s)", bucket, key, len(data), digest[:12])
    return Artifact(bucket, key, len(data), digest, rows, list(inputs), role)


# A large upload goes in parts of 8 MiB, each read into memory before it is sent: boto3's default
# buffers ten of them (stage 4's export of 100,000 rows grew by ~58 MiB as it uploaded); two parts in
# flight, one a core, grew it by ~26 MiB.
TRANSFER = boto3.s3.transfer.TransferConfig(max_concurrency=2)
TRANSFER.max_in_memory_upload_chunks = 2  # an attribute s3transfer reads, not an argument of boto3's


def put_stream(s3, bucket: str, key: str, fileobj: BinaryIO, *, size: int, digest: str, metadata: dict,
               content_type: str, rows: int | None = None, inputs: list[str] = (),
               role: str = "local") -> Artifact:
    """Upload a file object (multipart when large) whose size and sha256 are already known."""
    meta = _metadata({**metadata, "sha256": digest, "rows": rows})
    try:
        s3.upload_fileobj(fileobj, bucket, key, ExtraArgs={"Metadata": meta, "ContentType": content_type},
                          Config=TRANSFER)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
        raise _fail(s3, f"writing {key}", bucket, err) from None
    log.info("wrote s3://%s/%s (%d bytes, sha256 %s)", bucket, key, size, digest[:12])
    return Artifact(bucket, key, size, digest, rows, list(inputs), role)


def delete(s3, bucket: str, key: str) -> None:
    """Remove an object (nothing happens when it does not exist)."""
    try:
        s3.delete_object(Bucket=bucket, Key=key)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
        raise _fail(s3, f"deleting {key}", bucket, err) from None


def copy(s3, bucket: str, source_key: str, key: str) -> None:
    """Server-side copy within a bucket, keeping the metadata (used for `latest` keys)."""
    try:
        s3.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": source_key},
                       MetadataDirective="COPY")
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
        raise _fail(s3, f"copying {source_key} to {key}", bucket, err) from None


class ResumingBody:
    """An object's body, read forward: when the connection breaks off part-way, the rest is asked
    for again (a ranged GET of the same ETag, so a changed object is an error, not a splice), after
    a short backoff, as often as the client tries a call. What each GET answers (500, 503, no
    connection) botocore's retries handle, with their own backoff; this covers what they cannot, the
    body after the answer began. Raises StorageError naming the object when the tries run out."""

    def __init__(self, s3, bucket: str, key: str, obj: dict):
        self.s3, self.bucket, self.key = s3, bucket, key
        self.body, self.etag = obj["Body"], obj.get("ETag")
        self.offset = self.breaks = 0
        self.attempts = s3.meta.config.retries.get("total_max_attempts", 1)

    def readable(self) -> bool:
        return True

    def read(self, amt: int | None = None) -> bytes:
        amt = None if amt is None or amt < 0 else amt
        while True:
            try:
                chunk = self.body.read(amt)
            except BODY_ERRORS as err:
                self._resume(err)
                continue
            self.offset += len(chunk)
            return chunk

    def _resume(self, err: Exception) -> None:
        self.breaks += 1
        if self.breaks >= self.attempts:
            raise _fail(self.s3, f"reading {self.key} (broke off {self.breaks} times)", self.bucket, err) from None
        with contextlib.suppress(Exception):
            self.body.close()
        time.sleep(random.random() * 0.25 * 2 ** (self.breaks - 1))  # the store answered: a short pause
        log.warning("reading s3://%s/%s broke off after %d bytes (%s): asking for the rest", self.bucket,
                    self.key, self.offset, type(err).__name__)
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={self.offset}-",
                                     **({"IfMatch": self.etag} if self.etag else {}))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as again:
            raise _fail(self.s3, f"reading {self.key} again from byte {self.offset}", self.bucket, again) from None
        self.body = obj["Body"]

    def close(self) -> None:
        self.body.close()


def open_object(s3, bucket: str, key: str) -> tuple[ResumingBody, dict[str, str]]:
    """An object's body as a file object to read from (close it after), and its metadata."""
    try:
        obj = s3.get_object(Bucket=bucket, Key=key)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
        raise _fail(s3, f"reading {key}", bucket, err) from None
    return ResumingBody(s3, bucket, key, obj), obj.get("Metadata", {})


def get_bytes(s3, bucket: str, key: str) -> tuple[bytes, dict[str, str]]:
    body, meta = open_object(s3, bucket, key)
    try:
        return body.read(), meta
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
        raise _fail(s3, f"reading {key}", bucket, err) from None
    finally:
        body.close()


def get_spooled(s3, bucket: str, key: str) -> HashingSpool:
    """An object's bytes in a spool (on disk past 8 MiB), read from the start: for an object read in
    pieces, out of order (a Parquet file), that need not be held in memory. Close it after use."""
    body, _ = open_object(s3, bucket, key)
    spool = HashingSpool()
    try:
        while chunk := body.read(8 << 20):
            spool.write(chunk)
    except BaseException:
        spool.close()
        raise
    finally:
        body.close()
    spool.rewound()
    return spool


def head(s3, bucket: str, key: str) -> dict | None:
    """An object's size and metadata, or None when it does not exist."""
    try:
        obj = s3.head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise _fail(s3, f"reading {key}", bucket, err) from None
    except botocore.exceptions.BotoCoreError as err:
        raise _fail(s3, f"reading {key}", bucket, err) from None
    return {"size": obj["ContentLength"], "metadata": obj.get("Metadata", {})}


def list_objects(s3, bucket: str, prefix: str = "") -> list[dict]:
    """Every object under a prefix, as dicts with key, size and last_modified, sorted by key."""
    out = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [{"key": o["Key"], "size": o["Size"], "last_modified": o["LastModified"]}
                    for o in page.get("Contents", [])]
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
        raise _fail(s3, f"listing {prefix or '/'}", bucket, err) from None
    return sorted(out, key=lambda o: o["key"])


def read_ahead(body, chunk_bytes: int, digest=None, depth: int = 4):
    """The chunks of a file object (an object's body), read by a thread of their own up to `depth`
    chunks ahead of the caller and added to `digest` (a hashlib object) as they are read: reading the
    socket and hashing release the GIL, so they go on while the caller parses the chunk before.
    The last chunk is b""; an error reading is raised to the caller. Closing the generator (or
    leaving the loop) stops the thread."""
    chunks: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> None:
        while not stop.is_set():
            try:
                chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read() -> None:
        try:
            while not stop.is_set():
                chunk = body.read(chunk_bytes)
                if digest is not None:
                    digest.update(chunk)
                put(chunk)
                if not chunk:
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the caller, raised there
            put(err)

    reader = threading.Thread(target=read, name="read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            item = chunks.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if not item:
                return
    finally:
        stop.set()
        reader.join()


def _as_bytes(chunk) -> bytes:
    """What a writer was given, as bytes (COPY ... TO STDOUT writes text)."""
    return chunk.encode("utf-8") if isinstance(chunk, str) else chunk


class HashingSpool:
    """A write-only file that hashes and counts what passes through it, spilling to disk past 8 MiB,
    so a COPY ... TO STDOUT can stream into an upload whose sha256 goes into its metadata."""

    def __init__(self, max_memory: int = 8 * 1024 * 1024):
        self.file = tempfile.SpooledTemporaryFile(max_size=max_memory)
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk) -> int:
        chunk = _as_bytes(chunk)
        self.hash.update(chunk)
        self.size += len(chunk)
        return self.file.write(chunk)

    @property
    def sha256(self) -> str:
        return self.hash.hexdigest()

    def rewound(self) -> BinaryIO:
        self.file.seek(0)
        return self.file

    def close(self) -> None:
        self.file.close()


class Tee:
    """A write-only sink that passes what it is given on to each of `sinks`, in order, gathered into
    pieces of about `size` bytes (COPY writes one row per call); call flush() at the end."""

    def __init__(self, *sinks, size: int = 1 << 20):
        self.sinks, self.size = sinks, size
        self.pending: list[bytes] = []
        self.pending_size = 0

    def write(self, chunk) -> int:
        chunk = _as_bytes(chunk)
        self.pending.append(chunk)
        self.pending_size += len(chunk)
        if self.pending_size >= self.size:
            self.flush()
        return len(chunk)

    def flush(self) -> None:
        if self.pending:
            data = b"".join(self.pending)
            self.pending, self.pending_size = [], 0
            for sink in self.sinks:
                sink.write(data)
