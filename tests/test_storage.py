"""lib.storage against the real embedded SeaweedFS S3 server."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io

import boto3
import botocore.exceptions
import pytest

from lib import storage
from lib.config import Secret
from lib.names import InvalidName
from lib.storage import StorageError


@pytest.fixture
def bucket(s3, unique):
    name = f"t-{unique}"
    storage.ensure_bucket(s3, name)
    return name


def test_put_bytes_writes_the_object_with_run_id_sha256_and_rows(s3, bucket):
    data = b"name_common\nAruba\nPeru\n"
    art = storage.put_bytes(s3, bucket, "countries/run_id=r1/x.csv", data, rows=2, content_type="text/csv",
                            metadata={"Run-Id": "r1", "stage": "02_clean", "skipped": None},
                            inputs=["s3://raw/k"])
    assert art.sha256 == hashlib.sha256(data).hexdigest() and art.size == len(data)
    assert art.uri == f"s3://{bucket}/countries/run_id=r1/x.csv"
    assert art.to_dict()["uri"] == art.uri and art.to_dict()["inputs"] == ["s3://raw/k"]
    body, meta = storage.get_bytes(s3, bucket, "countries/run_id=r1/x.csv")
    assert body == data
    assert meta == {"run-id": "r1", "stage": "02_clean", "sha256": art.sha256, "rows": "2"}
    headed = storage.head(s3, bucket, "countries/run_id=r1/x.csv")
    assert headed == {"size": len(data), "metadata": meta}
    assert s3.head_object(Bucket=bucket, Key="countries/run_id=r1/x.csv")["ContentType"] == "text/csv"


def test_head_of_a_missing_key_is_none(s3, bucket):
    assert storage.head(s3, bucket, "no/such/key") is None


def test_get_of_a_missing_key_is_a_storage_error_naming_the_bucket(s3, bucket):
    with pytest.raises(StorageError, match=f"bucket '{bucket}'.*NoSuchKey"):
        storage.get_bytes(s3, bucket, "no/such/key")


def test_list_objects_is_sorted_by_key_and_filtered_by_prefix(s3, bucket):
    for key in ("p/c.csv", "p/a.csv", "q/z.csv", "p/b/d.csv"):
        storage.put_bytes(s3, bucket, key, key.encode(), metadata={}, content_type="text/plain")
    listed = storage.list_objects(s3, bucket, "p/")
    assert [o["key"] for o in listed] == ["p/a.csv", "p/b/d.csv", "p/c.csv"]
    assert all(o["size"] == len(o["key"]) and o["last_modified"] for o in listed)
    assert [o["key"] for o in storage.list_objects(s3, bucket)] == ["p/a.csv", "p/b/d.csv", "p/c.csv", "q/z.csv"]
    assert storage.list_objects(s3, bucket, "none/") == []


def test_list_objects_pages_past_one_thousand_keys(s3, bucket):
    from concurrent.futures import ThreadPoolExecutor

    keys = [f"many/{i:04d}" for i in range(1005)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=b"x"), keys))
    assert [o["key"] for o in storage.list_objects(s3, bucket, "many/")] == keys


def test_copy_keeps_content_and_metadata(s3, bucket):
    storage.put_bytes(s3, bucket, "run/x.csv", b"abc", metadata={"run-id": "r9"}, content_type="text/csv", rows=1)
    storage.copy(s3, bucket, "run/x.csv", "latest/x.csv")
    body, meta = storage.get_bytes(s3, bucket, "latest/x.csv")
    assert body == b"abc" and meta["run-id"] == "r9" and meta["sha256"] == storage.sha256(b"abc")


def test_a_wrong_secret_key_is_refused_by_the_server(settings, bucket):
    wrong = dataclasses.replace(settings.store, secret_key=Secret("definitely-not-the-secret"))
    bad = storage.client(wrong)
    with pytest.raises(botocore.exceptions.ClientError) as err:
        bad.list_buckets()
    assert err.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId")
    with pytest.raises(StorageError, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId") as err:
        storage.put_bytes(bad, bucket, "x", b"x", metadata={}, content_type="text/plain")
    assert "definitely-not-the-secret" not in str(err.value)
    assert settings.store.url in str(err.value)


def test_an_unknown_access_key_is_refused_by_the_server(settings, bucket):
    bad = storage.client(dataclasses.replace(settings.store, access_key=Secret("nobody")))
    with pytest.raises(StorageError, match="InvalidAccessKeyId|AccessDenied|SignatureDoesNotMatch"):
        storage.put_bytes(bad, bucket, "x", b"x", metadata={}, content_type="text/plain")
    with pytest.raises(StorageError, match="403"):  # HEAD answers carry no error code, only the status
        storage.ensure_bucket(bad, bucket)
    assert storage.head(storage.client(settings.store), bucket, "x") is None


def test_hashing_spool_matches_hashlib_and_gives_back_every_byte():
    chunks = [b"a,b\n", "Åland,1\n", b"x" * 5000]
    spool = storage.HashingSpool(max_memory=1024)  # spills to disk past 1 KiB
    for chunk in chunks:
        spool.write(chunk)
    expected = b"".join(c.encode("utf-8") if isinstance(c, str) else c for c in chunks)
    assert spool.sha256 == hashlib.sha256(expected).hexdigest()
    assert spool.size == len(expected)
    assert spool.rewound().read() == expected
    spool.close()


def test_put_stream_uploads_a_spool_with_its_known_digest(s3, bucket):
    spool = storage.HashingSpool()
    payload = b"row\n" * 10000
    spool.write(payload)
    art = storage.put_stream(s3, bucket, "stream/x.csv", spool.rewound(), size=spool.size, digest=spool.sha256,
                             metadata={"run-id": "r1"}, content_type="text/csv", rows=10000, role="cloud")
    body, meta = storage.get_bytes(s3, bucket, "stream/x.csv")
    assert body == payload and meta["sha256"] == hashlib.sha256(payload).hexdigest() == art.sha256
    assert art.role == "cloud" and art.size == len(payload)


def test_get_spooled_gives_an_object_in_a_spool_on_disk_read_from_its_start(s3, bucket):
    """What stage 5 reads the previous gold table into: past 8 MiB the bytes are on disk, not in memory."""
    import os

    payload = os.urandom(9 << 20)
    storage.put_bytes(s3, bucket, "spooled/x.parquet", payload, metadata={"run-id": "r1"},
                      content_type="application/octet-stream", rows=1)
    spool = storage.get_spooled(s3, bucket, "spooled/x.parquet")
    try:
        assert spool.file._rolled and spool.size == len(payload)  # on disk
        assert spool.sha256 == hashlib.sha256(payload).hexdigest()
        assert spool.file.read() == payload  # ready to read, from the start
    finally:
        spool.close()
    with pytest.raises(storage.StorageError, match=bucket):
        storage.get_spooled(s3, bucket, "spooled/missing.parquet")


def test_put_stream_uploads_a_large_spool_in_parts_two_at_a_time(s3, bucket):
    """Past 8 MiB the upload goes in parts (each read into memory as it is sent), at most two at once."""
    import threading

    lock, flying, most, parts = threading.Lock(), [0], [0], []

    def started(params, **_):
        with lock:
            flying[0] += 1
            most[0] = max(most[0], flying[0])
            parts.append(params["query_string"]["partNumber"])

    def ended(**_):
        with lock:
            flying[0] -= 1

    s3.meta.events.register("before-call.s3.UploadPart", started, unique_id="test-parts-started")
    s3.meta.events.register("after-call.s3.UploadPart", ended, unique_id="test-parts-ended")
    try:
        spool = storage.HashingSpool()
        payload = bytes(range(256)) * (41 * 4096)  # 41 MiB: six parts
        spool.write(payload)
        art = storage.put_stream(s3, bucket, "stream/large.bin", spool.rewound(), size=spool.size,
                                 digest=spool.sha256, metadata={}, content_type="application/octet-stream")
    finally:
        s3.meta.events.unregister("before-call.s3.UploadPart", unique_id="test-parts-started")
        s3.meta.events.unregister("after-call.s3.UploadPart", unique_id="test-parts-ended")
    body, meta = storage.get_bytes(s3, bucket, "stream/large.bin")
    assert body == payload and meta["sha256"] == art.sha256 == hashlib.sha256(payload).hexdigest()
    assert sorted(map(int, parts)) == [1, 2, 3, 4, 5, 6] and most[0] == 2


def test_ensure_bucket_is_idempotent(s3, unique):
    name = f"idem-{unique}"
    storage.ensure_bucket(s3, name)
    storage.ensure_bucket(s3, name)
    storage.ensure_bucket(s3, name, create=False)
    assert name in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_ensure_bucket_without_create_refuses_a_missing_bucket(s3, unique):
    with pytest.raises(StorageError, match="does not exist"):
        storage.ensure_bucket(s3, f"missing-{unique}", create=False)
    assert f"missing-{unique}" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]


@pytest.mark.parametrize("name", ["Bad_Bucket", "ab", "a..b", "10.0.0.1"])
def test_ensure_bucket_refuses_an_invalid_name_before_asking_the_server(s3, name):
    with pytest.raises(InvalidName):
        storage.ensure_bucket(s3, name)
    assert name not in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_an_object_store_that_is_not_running_is_named():
    config = storage.client_config(probe=True)
    s3 = boto3.session.Session().client("s3", endpoint_url="http://127.0.0.1:9", aws_access_key_id="a",
                                        aws_secret_access_key="b", region_name="us-east-1", config=config)
    with pytest.raises(StorageError, match="127.0.0.1:9 bucket 'raw': the object store is not answering"):
        storage.get_bytes(s3, "raw", "k")


def test_cloud_client_of_the_emulated_cloud_reaches_the_local_store(settings, unique):
    cloud = storage.cloud_client(settings.cloud)
    storage.ensure_bucket(cloud, f"cloud-{unique}")
    art = storage.put_bytes(cloud, f"cloud-{unique}", "e/x.csv", b"1", metadata={}, content_type="text/csv",
                            role="cloud")
    assert storage.head(cloud, f"cloud-{unique}", "e/x.csv")["size"] == 1 and art.role == "cloud"
    assert io.BytesIO(storage.get_bytes(cloud, f"cloud-{unique}", "e/x.csv")[0]).read() == b"1"


def test_clients_are_built_once_per_settings(settings):
    assert storage.client(settings.store) is storage.client(settings.store)
    assert storage.cloud_client(settings.cloud) is storage.cloud_client(settings.cloud)
    other = dataclasses.replace(settings.store, access_key=Secret("someone-else"))
    assert storage.client(other) is not storage.client(settings.store)


def test_every_profile_and_region_reads_the_service_models_parsed_once(settings, unique, tmp_path, monkeypatch):
    """A cloud in a region of its own, or under a profile of its own, gets a client of that region
    and profile, from the one parse of botocore's service models."""
    (tmp_path / "config").write_text("[profile other]\nregion = eu-north-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setattr(storage, "_SESSIONS", {})
    storage.client.cache_clear()
    storage.cloud_client.cache_clear()
    local = storage.client(dataclasses.replace(settings.store, region="us-east-1"))
    elsewhere = storage.cloud_client(dataclasses.replace(settings.cloud, region="eu-west-2", profile=None))
    profiled = storage.cloud_client(dataclasses.replace(settings.cloud, region=None, profile="other"))
    assert (local.meta.region_name, elsewhere.meta.region_name, profiled.meta.region_name) == \
        ("us-east-1", "eu-west-2", "eu-north-1")
    assert sorted(storage._SESSIONS, key=str) == [None, "other"]
    assert storage._SESSIONS[None]._loader is storage._SESSIONS["other"]._loader
    # and each still talks to its server with its own keys
    storage.ensure_bucket(elsewhere, f"region-{unique}")
    assert storage.head(local, f"region-{unique}", "none") is None


def test_read_ahead_gives_every_byte_of_an_object_and_hashes_it_as_read(s3, bucket):
    data = bytes(range(256)) * 40_000  # 10 MB, many chunks
    s3.put_object(Bucket=bucket, Key="big.bin", Body=data)
    body, _ = storage.open_object(s3, bucket, "big.bin")
    digest = hashlib.sha256()
    chunks = list(storage.read_ahead(body, 1 << 20, digest))
    assert chunks[-1] == b"" and all(chunks[:-1])
    assert b"".join(chunks) == data and digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_read_ahead_stops_its_thread_when_the_reader_leaves_early(s3, bucket):
    import threading

    s3.put_object(Bucket=bucket, Key="big.bin", Body=b"x" * 5_000_000)
    body, _ = storage.open_object(s3, bucket, "big.bin")
    chunks = storage.read_ahead(body, 65_536, depth=2)
    assert next(chunks) == b"x" * 65_536
    chunks.close()
    body.close()
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]


def test_read_ahead_raises_a_read_error_to_the_reader():
    class Broken(io.BytesIO):
        def read(self, n=-1):
            if self.tell() >= 10:
                raise OSError("connection reset")
            return super().read(5)

    chunks = storage.read_ahead(Broken(b"0123456789abcdef"), 5)
    assert next(chunks) == b"01234" and next(chunks) == b"56789"
    with pytest.raises(OSError, match="connection reset"):
        next(chunks)


def test_tee_passes_every_byte_to_each_sink_in_order_once_flushed():
    first, second = io.BytesIO(), io.BytesIO()
    tee = storage.Tee(first, second, size=10)
    for chunk in (b"abc", "déf", b"0123456789", b"z"):
        tee.write(chunk)
    assert first.getvalue() == second.getvalue() == "abcdéf0123456789".encode()  # passed on past 10 bytes
    tee.flush()
    assert first.getvalue() == second.getvalue() == "abcdéf0123456789z".encode()


# --- transient failures: retried, with backoff --------------------------------------------------------

class CuttingProxy:
    """A real TCP proxy in front of the store that breaks off its first answers part-way: each
    connection takes the next number of `cuts` and passes on only that many bytes of the answer
    before closing, as a dropped connection does (the store and the client are real)."""

    def __init__(self, upstream_port: int, cuts: list[int]):
        import socket
        import threading

        self.upstream, self.cuts, self.connections = upstream_port, list(cuts), 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            cut = self.cuts.pop(0) if self.cuts else None
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, cut), daemon=True).start()

    @staticmethod
    def _pump(source, target, cut: int | None) -> None:
        import socket

        passed = 0
        try:
            while data := source.recv(65536):
                if cut is not None and passed + len(data) >= cut:
                    target.sendall(data[:cut - passed])
                    break
                target.sendall(data)
                passed += len(data)
        except OSError:
            pass
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def big_object(s3, bucket):
    data = hashlib.sha256(b"seed").digest() * 16_384  # 512 KiB
    s3.put_object(Bucket=bucket, Key="big/object.bin", Body=data)
    return bucket, "big/object.bin", data


def proxied(settings, cuts: list[int]):
    proxy = CuttingProxy(int(settings.store.url.rsplit(":", 1)[1]), cuts)
    store = dataclasses.replace(settings.store, url=f"http://127.0.0.1:{proxy.port}")
    return proxy, storage.client(store)


def test_a_body_broken_off_part_way_is_read_again_from_where_it_broke(settings, big_object):
    bucket, key, data = big_object
    proxy, s3 = proxied(settings, [100_000, 300_000])  # the first two answers break off mid-body
    try:
        body, meta = storage.get_bytes(s3, bucket, key)
        assert body == data and meta == {}
        assert proxy.connections == 3
        stream, _ = storage.open_object(s3, bucket, key)  # streamed in chunks, as the stages read
        proxy.cuts = [200_000]
        assert b"".join(iter(lambda: stream.read(65_536), b"")) == data
        stream.close()
    finally:
        proxy.close()


def test_a_body_that_keeps_breaking_off_is_a_storage_error_naming_the_object(settings, big_object):
    bucket, key, _ = big_object
    proxy, s3 = proxied(settings, [50_000] * 10)
    try:
        with pytest.raises(StorageError, match=f"reading {key} .*broke off.* bucket '{bucket}'"):
            storage.get_bytes(s3, bucket, key)
        assert proxy.connections == storage.ATTEMPTS
    finally:
        proxy.close()


def test_5xx_answers_to_reads_are_retried_by_the_clients_configuration(settings, big_object):
    """The one place a fault is injected by hand: the answers below never reach the store. It shows
    that the clients' retry configuration covers reads (500 InternalError, 503 SlowDown); whether an
    answer is transient is botocore's standard mode's decision, and the real store serves the rest."""
    from botocore.awsrequest import AWSResponse

    bucket, key, data = big_object
    s3 = storage.client(dataclasses.replace(settings.store, kind="retry probe"))  # a client of its own
    seen: list[str] = []

    class Raw:
        def __init__(self, body: bytes):
            self.body = body

        def stream(self, **_):
            yield self.body

    def fail_twice(request, **_):
        operation = request.context.get("operation_name") if hasattr(request, "context") else None
        seen.append(operation or request.url)
        if len(seen) % 3:  # two failures, then the real store
            status, code = (500, "InternalError") if len(seen) % 3 == 1 else (503, "SlowDown")
            body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
            return AWSResponse(request.url, status, {"Content-Length": str(len(body))}, Raw(body))
        return None

    s3.meta.events.register("before-send.s3", fail_twice)
    try:
        assert storage.get_bytes(s3, bucket, key)[0] == data
        assert storage.head(s3, bucket, key)["size"] == len(data)
        assert [o["key"] for o in storage.list_objects(s3, bucket, "big/")] == [key]
    finally:
        s3.meta.events.unregister("before-send.s3", fail_twice)
    assert len(seen) == 9  # three reads, each answered 500, then 503, then by the store
