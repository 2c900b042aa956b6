"""lib.source against a real local HTTP server that answers like REST Countries (tests/api_server.py)."""

from __future__ import annotations

import email.utils
import json
import time

import pytest

from lib import contract, source
from lib.source import HttpError, PayloadError, SourceError, Unreachable
from tests.api_server import FIELDS_MESSAGE, Scripted

CLOSED = "http://127.0.0.1:9/v3.1/all?fields=name"  # nothing listens on the discard port
FAST = {"backoff": 0.01, "max_backoff": 0.05}


# --- fetch ------------------------------------------------------------------------------------------

def test_fetch_returns_the_api_answer_with_the_ten_fields(api):
    got = source.fetch(api.url)
    records = source.parse_payload(got.data)
    assert got.origin == "api" and got.url == api.url
    assert len(records) == 250
    assert all(set(r) <= set(contract.SOURCE_FIELDS) for r in records)
    assert [(a["attempt"], a["status"]) for a in got.attempts] == [(1, 200)]
    assert set(got.attempts[0]) == {"attempt", "status", "seconds"}  # no wait: nothing was retried
    assert len(api.requests) == 1


def test_the_test_api_serves_copies_with_unique_names_as_one_streamed_answer(api):
    api.copies = 3
    records = source.parse_payload(source.fetch(api.url).data)
    assert len(records) == 750 and len({r["name"]["common"] for r in records}) == 750
    assert records[:250] == source.project(json.loads(source.snapshot_bytes()))
    assert records[250]["name"]["common"] == records[0]["name"]["common"] + " #1"
    assert {k: v for k, v in records[250].items() if k != "name"} == {k: v for k, v in records[0].items() if k != "name"}


def test_two_503s_then_200_succeeds_with_exactly_three_requests(api):
    api.queue(Scripted(503, b"busy"), Scripted(503, b"busy"))
    got = source.fetch(api.url, **FAST)
    assert len(api.requests) == 3
    assert [a["status"] for a in got.attempts] == [503, 503, 200]
    assert len(source.parse_payload(got.data)) == 250


def test_429_waits_as_long_as_retry_after_says(api):
    api.queue(Scripted(429, b"slow down", {"Retry-After": "2"}))
    started = time.monotonic()
    got = source.fetch(api.url, backoff=0.01)
    elapsed = time.monotonic() - started
    assert 1.9 <= elapsed < 8
    assert [a["status"] for a in got.attempts] == [429, 200]
    gap = api.requests[1]["at"] - api.requests[0]["at"]
    assert gap >= 1.9


def test_429_with_an_http_date_retry_after_waits_until_then(api):
    when = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: waits 1-2s
    api.queue(Scripted(429, b"slow down", {"Retry-After": when}))
    started = time.monotonic()
    got = source.fetch(api.url, backoff=0.01)
    assert 0.9 <= time.monotonic() - started < 8
    assert [a["status"] for a in got.attempts] == [429, 200]


def test_429_with_an_unparseable_retry_after_falls_back_to_backoff(api):
    api.queue(Scripted(429, b"slow down", {"Retry-After": "soon"}))
    got = source.fetch(api.url, **FAST)
    assert [a["status"] for a in got.attempts] == [429, 200]


def test_a_retry_after_longer_than_the_budget_gives_up_at_once(api):
    api.queue(Scripted(429, b"slow down", {"Retry-After": "30"}))
    started = time.monotonic()
    with pytest.raises(Unreachable, match="budget") as err:
        source.fetch(api.url, max_total_seconds=3)
    assert time.monotonic() - started < 2
    assert "HTTP 429" in str(err.value)
    assert len(api.requests) == 1


def test_a_400_is_not_retried_and_its_body_is_in_the_error(api):
    url = f"{api.base}/v3.1/all?fields=name,"  # a blank field name: the API answers 400
    with pytest.raises(HttpError) as err:
        source.fetch(url, **FAST)
    assert len(api.requests) == 1
    assert "HTTP 400" in str(err.value)
    assert FIELDS_MESSAGE["message"] in str(err.value)


def test_a_scripted_404_is_final_too(api):
    api.queue(Scripted(404, b'{"status":404,"message":"Not Found"}'))
    with pytest.raises(HttpError, match="Not Found"):
        source.fetch(api.url, **FAST)
    assert len(api.requests) == 1


def test_persistent_5xx_gives_up_after_max_attempts(api):
    api.queue(*[Scripted(502, b"bad gateway")] * 3)
    with pytest.raises(Unreachable, match=r"after 3 attempt\(s\): HTTP 502: bad gateway"):
        source.fetch(api.url, max_attempts=3, **FAST)
    assert len(api.requests) == 3


def test_connection_refused_raises_unreachable_within_the_budget():
    started = time.monotonic()
    with pytest.raises(Unreachable, match="Connection refused") as err:
        source.fetch(CLOSED, max_attempts=3, backoff=0.05, max_total_seconds=5)
    assert time.monotonic() - started < 5
    assert "3 attempt(s)" in str(err.value)


def test_the_total_budget_cuts_retries_short():
    started = time.monotonic()
    with pytest.raises(Unreachable, match="budget"):
        source.fetch(CLOSED, max_attempts=10, backoff=5, max_backoff=8, max_total_seconds=1)
    assert time.monotonic() - started < 1.5


def test_a_slow_answer_times_out_and_is_retried(api):
    api.queue(Scripted(200, b"[]", delay=1.5))
    got = source.fetch(api.url, read_timeout=0.3, **FAST)
    assert (got.attempts[0]["attempt"], got.attempts[0]["error"]) == (1, "ReadTimeout")
    assert {"seconds", "wait_before_next_s"} <= set(got.attempts[0])
    assert got.attempts[-1]["status"] == 200


def with_credentials(url: str) -> str:
    """The URL with a password and an API key that no message may show."""
    return url.replace("://", "://reader:PASSWORD-1234@") + "&apikey=KEY-5678"


def hides_credentials(text: str) -> bool:
    return "PASSWORD-1234" not in text and "KEY-5678" not in text and "***@" in text and "apikey=***" in text


def test_a_url_with_credentials_is_asked_with_them_and_never_shown(api, caplog):
    api.queue(Scripted(503, b"busy"))
    with caplog.at_level("INFO", logger="lib.source"):
        got = source.fetch(with_credentials(api.url), **FAST)
    assert [r["path"].endswith("&apikey=KEY-5678") for r in api.requests] == [True, True]
    assert got.url == api.url.replace("://", "://***@") + "&apikey=***"
    assert len(caplog.records) == 2 and all(hides_credentials(r.getMessage()) for r in caplog.records)


def test_errors_never_show_the_credentials_of_the_url(api):
    # The API's answer echoes the key; the error quotes the URL and the answer.
    api.queue(Scripted(403, b'{"message": "key KEY-5678 of reader:PASSWORD-1234 is not allowed"}'))
    with pytest.raises(HttpError) as err:
        source.fetch(with_credentials(api.url), **FAST)
    assert "HTTP 403" in str(err.value) and hides_credentials(str(err.value))
    api.queue(*[Scripted(502, b"bad gateway for KEY-5678")] * 2)
    with pytest.raises(Unreachable) as err:
        source.fetch(with_credentials(api.url), max_attempts=2, **FAST)
    assert "HTTP 502" in str(err.value) and hides_credentials(str(err.value))
    # requests' own error quotes the request's path and query.
    with pytest.raises(Unreachable, match="Connection refused") as err:
        source.fetch(with_credentials(CLOSED), max_attempts=1)
    assert hides_credentials(str(err.value))
    with pytest.raises(SourceError, match="not an http") as err:
        source.check_url(with_credentials("ftp://h/v3.1/all?fields=name"))
    assert hides_credentials(str(err.value))
    with pytest.raises(SourceError, match="1 to 10 fields") as err:
        source.check_url(with_credentials("https://h/v3.1/all?fields="))
    assert hides_credentials(str(err.value))
    with pytest.raises(SourceError, match=r"not an http\(s\) URL") as err:  # not parseable: not shown at all
        source.check_url("http://reader:PASSWORD-1234@[::1/v3.1/all?fields=name")
    assert "PASSWORD-1234" not in str(err.value)


# --- check_url ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "https://restcountries.com/v3.1/all",
    "https://restcountries.com/v3.1/all?fields=",
    "https://restcountries.com/v3.1/all/?fields=,",
    "https://restcountries.com/v3.1/all?fields=" + ",".join(f"f{i}" for i in range(11)),
])
def test_check_url_refuses_all_without_one_to_ten_fields(url):
    with pytest.raises(SourceError, match="1 to 10 fields"):
        source.check_url(url)


@pytest.mark.parametrize("url", ["ftp://restcountries.com/v3.1/all?fields=name", "restcountries.com/v3.1",
                                 "http:///v3.1/all?fields=name"])
def test_check_url_refuses_non_http_urls(url):
    with pytest.raises(SourceError, match="not an http"):
        source.check_url(url)


@pytest.mark.parametrize("url", [
    "https://restcountries.com/v3.1/all?fields=" + ",".join(contract.SOURCE_FIELDS),
    "http://127.0.0.1:8080/v3.1/all?fields=name",
    "https://restcountries.com/v3.1/name/peru",
])
def test_check_url_accepts_what_the_api_answers(url):
    assert source.check_url(url) == url


def test_fetch_refuses_a_bad_url_before_sending_anything(api):
    with pytest.raises(SourceError, match="fields"):
        source.fetch(f"{api.base}/v3.1/all")
    assert api.requests == []


# --- parse_payload -----------------------------------------------------------------------------------

def test_parse_payload_of_the_snapshot_gives_250_records():
    assert len(source.parse_payload(source.snapshot_bytes(), min_records=250)) == 250


@pytest.mark.parametrize("data, problem", [
    (source.snapshot_bytes()[:5000], "truncated"),  # cut inside a multi-byte character
    (source.snapshot_bytes()[:-10], "truncated"),
    (b"<!DOCTYPE html><html><body>Service Unavailable</body></html>", "HTML page"),
    (b"  <html>maintenance</html>", "HTML page"),
    (json.dumps(FIELDS_MESSAGE).encode(), "JSON dict, not a list"),
    (b"[]", "empty list"),
    (b'[{"name": {}}, 3, "x"]', "2 of 3 items"),
    (b"\xff\xfe\xfa", "not UTF-8"),
    (b"", "not valid JSON"),
])
def test_parse_payload_names_the_problem(data, problem):
    with pytest.raises(PayloadError, match=problem):
        source.parse_payload(data)


@pytest.mark.parametrize("data, problem", [
    (source.snapshot_bytes()[:5000], "ends inside a UTF-8 character"),
    (source.snapshot_bytes()[:-10], "truncated"),
    (b"<!DOCTYPE html><html><body>Service Unavailable</body></html>", "HTML page"),
    (json.dumps(FIELDS_MESSAGE).encode(), "JSON dict, not a list"),
    (b"[]", "empty list"),
    (b'[{"name": {}}, 3, "x"]', "2 of 3 items"),
    (b'[{"a": 1}] [', "Extra data"),
    (b"\xff\xfe\xfa", "not UTF-8"),
    (b"", "not valid JSON"),
])
@pytest.mark.parametrize("piece", [1, 7, 4096])
def test_a_payload_fed_in_pieces_fails_as_a_whole_one_does(data, problem, piece):
    reader = source.PayloadReader()
    with pytest.raises(PayloadError, match=problem):
        for start in range(0, len(data), piece):
            reader.feed(data[start:start + piece])
        reader.close()


# Records json reads its own way (NaN, a number past a double, lone surrogates, duplicate fields), or
# that look like record boundaries inside a string, among ordinary ones.
EDGE_RECORDS = [
    b'{"n": 12345}', b'{"s": "\xed\xa0\x80 \\u00e9"}', b'{"t": "x}, {\\"u\\": 1}, {"}',
    b'{"v": [{"a": 1}, {"b": 2}],"w":{}}',
    b'{"big": 123456789012345678901234567890, "neg": -0.0, "tiny": 0.1e-320, "e": 1E2, "f": 1.0000000000000001}',
    b'{"huge": 1e400}', b'{"nan": NaN, "inf": -Infinity}', b'{"esc": "\\ud800 \\udc00x\\ud83d\\ude00 \\u0000 \\"q\\" \\\\ \\/"}',
    b'{"\\udfff": 1}', b'{"dup": 1, "dup": [2], "x": null}', b'{"deep": [[[[[[[[[[{"a": [true, false]}]]]]]]]]]]}',
]


@pytest.mark.parametrize("shallow", [False, True])
@pytest.mark.parametrize("piece", [1, 3, 1000, 10**7])
def test_a_payload_fed_in_pieces_gives_the_records_json_gives(piece, shallow):
    snapshot = source.snapshot_bytes()[1:-1]
    records_ = [snapshot, *EDGE_RECORDS[:4], snapshot, *EDGE_RECORDS[4:], snapshot]
    data = b"\xef\xbb\xbf [" + b" , ".join(records_) + b"]\n"
    reader, records = source.PayloadReader(min_records=750 + len(EDGE_RECORDS), shallow=shallow), []
    for start in range(0, len(data), piece):
        records += reader.feed(data[start:start + piece])
    records += reader.close()
    expected = json.loads(data.decode("utf-8-sig", "surrogatepass"))
    assert [source.full(r) for r in records] == expected if shallow else records == expected
    assert repr([source.full(r) for r in records]) == repr(expected)  # -0.0, nan and inf too
    assert reader.items == 750 + len(EDGE_RECORDS) and reader.size == len(data)


@pytest.mark.parametrize("bad, problem", [
    (b'{"x": "caf\xe9"}', "not UTF-8 text: 'utf-8' codec can't decode byte 0xe9"),
    (b'{"x": [1, 2,]}', "not valid JSON"),
    (b'{"x": NaN', "not valid JSON"),
])
def test_a_fault_deep_in_a_large_payload_is_reported_alike_whatever_the_reading(bad, problem):
    snapshot = source.snapshot_bytes()[1:-1]
    data = b"[" + b", ".join([snapshot, "{\"é\": \"漢字\"}".encode(), snapshot, bad, snapshot]) + b"]"
    messages = set()
    for shallow in (False, True):
        for piece in (1000, 1 << 16, len(data)):
            reader = source.PayloadReader(shallow=shallow)
            with pytest.raises(PayloadError, match=problem) as caught:
                for start in range(0, len(data), piece):
                    reader.feed(data[start:start + piece])
                reader.close()
            messages.add(str(caught.value))
    assert len(messages) == 1, messages


def test_runs_of_records_are_decoded_by_msgspec_and_a_shallow_reader_leaves_values_undecoded():
    import msgspec

    data = source.snapshot_bytes()
    reader = source.PayloadReader(shallow=True)
    records = reader.feed(data[:len(data) // 2]) + reader.feed(data[len(data) // 2:])
    assert reader._fast and len(records) == 249  # decoded from the bytes (no text made of them) up to the last
    records += reader.close()
    assert len(records) == 250 and list(records[100]) == list(json.loads(data)[100])
    assert sum(isinstance(r["name"], msgspec.Raw) for r in records) > 200  # the bulk path, shallow
    assert [source.full(r) for r in records] == json.loads(data)
    text = data.decode()
    assert source._decode_run(text, False) == json.loads(data)
    # What msgspec refuses is left to json: None, never a different value.
    for refused in ('[{"a": NaN}]', '[{"a": "\\ud800"}]', '[{"a": 1},]', '[{"a": "\ud800"}]', '[{"a": [1 2]}]'):
        assert source._decode_run(refused, False) is None and source._decode_run(refused, True) is None, refused
    assert source._decode_run('[{"a": 1e400}]', False) is None  # json reads it as inf
    assert source._decode_run("[1, 2]", True) is None  # not records: counted by json's path


def test_fetch_spools_the_answer_with_its_size_and_sha256(api):
    import hashlib

    api.copies = 60  # ~11 MB: past the in-memory part of the spool
    got = source.fetch(api.url)
    data = got.data
    assert got.size == len(data) and got.sha256 == hashlib.sha256(data).hexdigest()
    assert len(source.parse_payload(data)) == 15_000
    got.close()


def test_too_few_records_are_refused_with_the_counts():
    with pytest.raises(PayloadError, match="2 records, fewer than min_records=3"):
        source.parse_payload(b'[{"a": 1}, {"b": 2}]', min_records=3)


@pytest.mark.parametrize("body, problem", [
    (b"<html><body>Bad gateway</body></html>", "HTML"),
    (source.snapshot_bytes()[:3000], "truncated"),
])
def test_a_200_with_a_bad_body_is_fetched_then_refused_by_parse_payload(api, body, problem):
    api.queue(Scripted(200, body, {"Content-Type": "text/html"}))
    got = source.fetch(api.url)
    with pytest.raises(PayloadError, match=problem):
        source.parse_payload(got.data)


def test_project_keeps_only_the_named_fields():
    records = [{"name": "x", "area": 1, "cca2": "XX"}, {"area": 2}]
    assert source.project(records, ("name", "area")) == [{"name": "x", "area": 1}, {"area": 2}]


# --- ingest ------------------------------------------------------------------------------------------

def test_ingest_falls_back_to_the_snapshot_when_allowed_and_says_why():
    got = source.fetch_or_snapshot(CLOSED, fallback=True, max_attempts=2, **FAST)
    assert got.origin == "snapshot"
    assert got.data == source.snapshot_bytes()
    assert "Connection refused" in got.fallback_reason


def test_ingest_without_fallback_raises_unreachable():
    with pytest.raises(Unreachable):
        source.fetch_or_snapshot(CLOSED, fallback=False, max_attempts=2, **FAST)


def test_ingest_never_papers_over_an_api_error(api):
    with pytest.raises(HttpError):
        source.fetch_or_snapshot(f"{api.base}/v3.1/all?fields=name,", fallback=True, **FAST)


def test_ingest_uses_the_api_when_it_answers(api):
    got = source.fetch_or_snapshot(api.url, fallback=True)
    assert got.origin == "api" and got.fallback_reason is None


def test_a_consumer_is_fed_the_answer_as_it_arrives_and_its_error_ends_the_fetch(api):
    got = source.fetch(api.url, consume=source.PayloadReader)
    assert got.consumer.items == 250 and got.consumer.size == got.size
    api.queue(Scripted(200, source.snapshot_bytes()[:3000]))
    with pytest.raises(PayloadError, match="truncated"):
        source.fetch(api.url, consume=source.PayloadReader)
