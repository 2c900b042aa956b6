"""The REST Countries v3.1 source: a careful HTTP client, payload checks and the bundled snapshot."""

from __future__ import annotations

import codecs
import email.utils
import json
import logging
import random
import re
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from queue import Queue
from typing import BinaryIO
from urllib.parse import parse_qs, urlsplit

import msgspec
import requests
import tenacity

from lib import redact, storage
from lib.contract import MAX_SOURCE_FIELDS, SOURCE_FIELDS
from lib.errors import PipelineError

log = logging.getLogger(__name__)

SNAPSHOT = "countries_v3.1.json"


class SourceError(PipelineError):
    """The source could not be read."""


class HttpError(SourceError):
    """The API answered with an error that retrying will not fix; the message carries its body."""


class Unreachable(SourceError):
    """The API could not be reached within the retry budget."""


class PayloadError(SourceError):
    """The API answered, but not with a list of country records."""


@dataclass
class Fetched:
    """An answer spooled to a temporary file (in memory while small) as it arrived, with its size
    and sha256, so a payload of any size is never held whole."""
    file: BinaryIO
    size: int
    sha256: str
    origin: str  # "api" or "snapshot"
    url: str  # as shown: its credentials masked (lib/redact.py)
    attempts: list[dict] = field(default_factory=list)
    fallback_reason: str | None = None
    consumer: object = None  # what `consume` made and was fed the answer, if given

    def rewound(self) -> BinaryIO:
        self.file.seek(0)
        return self.file

    @property
    def data(self) -> bytes:
        """The whole answer as bytes (for small answers: tests, the snapshot)."""
        return self.rewound().read()

    def close(self) -> None:
        self.file.close()


CHUNK_BYTES = 4 * 1024 * 1024  # bytes read or received at a time
SPOOL_MEMORY = 8 * 1024 * 1024  # answers larger than this are spooled to disk


def _spooled(chunks, consumer=None) -> tuple[BinaryIO, int, str]:
    """Chunks of bytes written to a temporary file as they come, counted and hashed, and given to
    `consumer` (its `feed`, then its `close`) as they come: a payload is checked while it arrives.
    The consumer works in a thread of its own, a few chunks behind at most, so checking overlaps
    receiving (sockets, hashing and file writes release the GIL); what it raises is raised here,
    and receiving stops at once."""
    spool = storage.HashingSpool(max_memory=SPOOL_MEMORY)
    queue: Queue = Queue(maxsize=4)
    failed: list[BaseException] = []

    def consume() -> None:
        chunk = b""
        try:
            while (chunk := queue.get()) is not None:
                consumer.feed(chunk)
            consumer.close()
        except BaseException as err:  # noqa: BLE001 - handed to the receiving thread
            failed.append(err)
            while chunk is not None:  # let the receiving side finish putting
                chunk = queue.get()

    worker = threading.Thread(target=consume, name="payload-check", daemon=True) if consumer is not None else None
    if worker is not None:
        worker.start()
    try:
        try:
            for chunk in chunks:
                spool.write(chunk)
                if worker is not None:
                    if failed:
                        break
                    queue.put(chunk)
        finally:
            if worker is not None:
                queue.put(None)
                worker.join()
        if failed:
            raise failed[0]
    except BaseException:
        spool.close()
        raise
    return spool.rewound(), spool.size, spool.sha256


def check_url(url: str) -> str:
    """Refuse a URL that the live API would answer with 400, before sending it. Its messages show the
    URL with its credentials masked."""
    try:
        parts = urlsplit(url)
    except ValueError:  # a broken IPv6 host
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise SourceError(f"API URL {redact.url(url)!r} is not an http(s) URL")
    if parts.path.rstrip("/").endswith("/all"):
        fields = [f for f in ",".join(parse_qs(parts.query).get("fields", [])).split(",") if f.strip()]
        if not fields or len(fields) > MAX_SOURCE_FIELDS:
            raise SourceError(
                f"API URL {redact.url(url)!r} must name 1 to {MAX_SOURCE_FIELDS} fields (?fields=a,b,...): "
                "the REST Countries API answers /v3.1/all without them with HTTP 400"
            )
    return url


def short_error(err: Exception) -> str:
    """A connection error in one readable phrase (requests' own text nests several layers)."""
    text = str(err)
    for pattern in (r"Failed to resolve '[^']+'", r"Connection refused", r"Read timed out",
                    r"timed out", r"Connection reset by peer", r"Remote end closed connection",
                    r"too many \d+ error responses"):
        found = re.search(pattern, text)
        if found:
            return f"{type(err).__name__}: {found.group(0)}"
    return f"{type(err).__name__}: {text[:200]}"


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):  # neither seconds nor an HTTP date: use the normal backoff
        return None
    return max(0.0, when.timestamp() - time.time()) if when else None


class _Retryable(SourceError):
    """One failed attempt that may succeed if tried again (connection error, timeout, 5xx, 429)."""

    def __init__(self, problem: str, retry_after: float | None = None):
        super().__init__(problem)
        self.retry_after = retry_after


def _get(http: requests.Session, url: str, timeout: tuple[float, float], attempts: list[dict],
         consume=None) -> Fetched:
    """One request. Returns a good answer (its body spooled as it arrives and fed to a new
    `consume()`), raises HttpError for a final one, _Retryable otherwise (an answer cut off while
    arriving is retried too); what the consumer raises ends the fetch. What it says shows the URL
    masked, and neither its credentials nor an answer echoing them (lib/redact.py)."""
    attempt = len(attempts) + 1
    shown, secrets = redact.url(url), redact.url_secrets(url)
    sent = time.monotonic()
    try:
        response = http.get(url, timeout=timeout, headers={"Accept": "application/json"}, stream=True)
        if response.status_code < 400:
            with response:
                consumer = consume() if consume else None
                spool, size, digest = _spooled(response.iter_content(CHUNK_BYTES), consumer)
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
        attempts.append({"attempt": attempt, "error": type(err).__name__, "seconds": round(time.monotonic() - sent, 3)})
        raise _Retryable(redact.text(short_error(err), secrets)) from None
    attempts.append({"attempt": attempt, "status": response.status_code, "seconds": round(time.monotonic() - sent, 3)})
    if response.status_code < 400:
        log.info("GET %s -> %s (%d bytes, attempt %d)", shown, response.status_code, size, attempt)
        return Fetched(spool, size, digest, "api", shown, consumer=consumer)
    body = redact.text(response.text[:2000], secrets)
    if response.status_code != 429 and response.status_code < 500:
        raise HttpError(f"GET {shown} answered HTTP {response.status_code}: {body}")
    raise _Retryable(f"HTTP {response.status_code}: {body[:300]}",
                     _retry_after(response) if response.status_code == 429 else None)


def fetch(url: str, *, connect_timeout: float = 5.0, read_timeout: float = 30.0, max_attempts: int = 4,
          backoff: float = 0.5, max_backoff: float = 8.0, max_total_seconds: float = 60.0,
          session: requests.Session | None = None, consume=None) -> Fetched:
    """GET with timeouts and retries (a tenacity policy): exponential backoff with jitter on connection
    errors, timeouts, 5xx and 429 (honouring Retry-After), no retry that would end past
    `max_total_seconds`. Any other 4xx is final and its body is part of the error. The answer is
    spooled as it arrives; `consume`, when given, makes an object fed each piece as it arrives
    (`feed`, then `close`; one per attempt), such as a PayloadReader checking it meanwhile."""
    check_url(url)
    shown = redact.url(url)
    http = session or requests.Session()
    attempts: list[dict] = []
    exponential = tenacity.wait_exponential(multiplier=backoff, max=max_backoff)
    upcoming: list[float] = []

    def wait(state: tenacity.RetryCallState) -> float:
        retry_after = getattr(state.outcome.exception(), "retry_after", None)
        seconds = retry_after if retry_after is not None else exponential(state) * random.uniform(0.5, 1.0)
        upcoming.append(seconds)
        return seconds

    def before_sleep(state: tenacity.RetryCallState) -> None:
        attempts[-1]["wait_before_next_s"] = round(state.upcoming_sleep, 2)
        log.warning("GET %s failed (%s); retry %d in %.1fs", shown, state.outcome.exception(),
                    state.attempt_number + 1, state.upcoming_sleep)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(_Retryable),
        wait=wait,
        stop=tenacity.stop_after_attempt(max_attempts) | tenacity.stop_before_delay(max_total_seconds),
        before_sleep=before_sleep,
    )
    try:
        fetched = retrying(_get, http, url, (connect_timeout, read_timeout), attempts, consume)
    except tenacity.RetryError as err:
        problem = str(err.last_attempt.exception())
        if len(attempts) < max_attempts:
            problem += f" (next retry in {upcoming[-1]:.1f}s would pass the {max_total_seconds:.0f}s budget)"
        unreachable = Unreachable(f"GET {shown} failed after {len(attempts)} attempt(s): {problem}")
        unreachable.attempts = attempts  # shown by stage 1 when the snapshot is used instead
        raise unreachable from None
    fetched.attempts = attempts
    return fetched


def snapshot_bytes() -> bytes:
    return resources.files("lib.data").joinpath(SNAPSHOT).read_bytes()


def fetch_or_snapshot(url: str, *, fallback: bool, consume=None, **fetch_options) -> Fetched:
    """Fetch from the API; when it cannot be reached and fallback is allowed, use the bundled
    snapshot and say so. An API that answers with an error is never papered over."""
    try:
        return fetch(url, consume=consume, **fetch_options)
    except Unreachable as err:
        if not fallback:
            raise
        log.warning("API unreachable, USING THE BUNDLED SNAPSHOT instead: %s", err)
        consumer = consume() if consume else None
        spool, size, digest = _spooled([snapshot_bytes()], consumer)
        return Fetched(spool, size, digest, "snapshot", redact.url(url), getattr(err, "attempts", []), fallback_reason=str(err),
                       consumer=consumer)


_WS = re.compile(r"[ \t\n\r]*")
_WS_BYTES = re.compile(rb"[ \t\n\r]*")
_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))  # the bytes of a UTF-8 character after its first
_DECODER = json.JSONDecoder()


class PayloadReader:
    """The payload parsed as it arrives: `feed` takes bytes and returns the records complete so
    far, `close` returns the last ones and raises PayloadError for what is wrong with the whole
    (the messages `parse_payload` gives). The text is kept only from the first incomplete record
    on, so a payload of any size is never held whole. Each record is decoded by the C json decoder
    (`raw_decode`); a record cut off by the end of the data received so far is decoded again once
    at least as much again has arrived. A payload that is not a UTF-8 JSON array (an error, or a
    rare UTF-16 one) is parsed whole at the end (`parse_whole`).
    Whole runs of records are decoded by msgspec where it can (`_decode_run`): the same values json
    gives, several times faster. With shallow=True only each record's fields are decoded, their
    values kept as msgspec.Raw (the JSON checked, not built: the ingest's scan needs the fields
    alone); `full` turns such a record into the one json gives."""

    def __init__(self, min_records: int = 1, shallow: bool = False):
        self.min_records = min_records
        self.shallow = shallow
        self.size = 0  # bytes fed
        self.items = 0  # items in the array
        self.not_objects = 0
        self._head = b""  # the first bytes, until the HTML and encoding checks have been made
        self._whole: bytearray | None = None
        self._decoder = None
        self._skipped = 0  # bytes before the text (a UTF-8 byte order mark)
        self._fed = 0  # bytes given to the text decoder
        self._text = ""
        self._pos = 0  # where parsing goes on in _text
        self._offset = 0  # characters dropped from the front of _text
        self._state = "start"  # start, first, item, after, done
        self._cut = 0  # length of a record cut off by the end of the text so far
        self._bulk, self._misses = True, 0  # decode whole runs of records at once (`_bulk_items`)
        self._fast, self._raw = True, b""  # decode runs straight from the bytes (`_feed_bytes`), and what waits

    def feed(self, chunk: bytes) -> list[dict]:
        self.size += len(chunk)
        if self._whole is not None:
            self._whole += chunk
            return []
        if self._decoder is None:
            self._head += chunk
            if len(self._head) < 200:
                return []
            chunk = self._start()
            if self._whole is not None:
                return []
        if self._fast:
            return self._feed_bytes(chunk)
        return self._parse(self._decode(chunk, final=False), final=False)

    def close(self) -> list[dict]:
        out = []
        if self._decoder is None and self._whole is None:
            chunk = self._start()
            if self._whole is None:
                out = self._to_text(chunk)
        if self._whole is not None:
            return self._close_whole()
        if self._fast:
            out += self._to_text(self._raw)
        out += self._parse(self._decode(b"", final=True), final=True)
        self._check_counts()
        return out

    def _check_counts(self) -> None:
        if not self.items:
            raise PayloadError("the API answered with an empty list: no countries")
        if self.not_objects:
            raise PayloadError(f"{self.not_objects} of {self.items} items in the API answer are not JSON objects")
        if self.items < self.min_records:
            raise PayloadError(
                f"the API answered with {self.items} records, fewer than min_records={self.min_records}")

    # --- the start: HTML, the encoding, an array or not ---------------------------------------------

    def _start(self) -> bytes:
        data, self._head = self._head, b""
        head = data[:200].lstrip().lower()
        if head.startswith((b"<!doctype", b"<html", b"<")):
            raise PayloadError("the API answered with an HTML page, not JSON: " + data[:120].decode("utf-8", "replace"))
        encoding = json.detect_encoding(data)
        text = data[3:] if encoding == "utf-8-sig" else data
        first = text.lstrip(b" \t\n\r")[:1]
        if encoding not in ("utf-8", "utf-8-sig") or first not in (b"", b"["):
            self._whole = bytearray(data)
            return b""
        self._skipped = len(data) - len(text)
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogatepass")
        return text

    def _decode(self, chunk: bytes, final: bool) -> str:
        pending = len(self._decoder.getstate()[0])
        try:
            text = self._decoder.decode(chunk, final)
        except UnicodeDecodeError as err:
            at = self._skipped + self._fed - pending + err.start
            if err.reason == "unexpected end of data":  # cut inside a multi-byte character
                raise PayloadError(f"the API answer ends inside a UTF-8 character (byte {at} of "
                                   f"{self.size}): truncated") from None
            raise PayloadError(f"the API answer is not UTF-8 text: 'utf-8' codec can't decode byte "
                               f"0x{err.object[err.start]:02x} in position {at}: {err.reason}") from None
        self._fed += len(chunk)
        return text

    def _close_whole(self) -> list[dict]:
        payload = parse_whole(bytes(self._whole))
        self._whole = None
        if not isinstance(payload, list):
            raise PayloadError(f"the API answer is a JSON {type(payload).__name__}, not a list of countries")
        self.items = len(payload)
        self.not_objects = sum(1 for r in payload if not isinstance(r, dict))
        self._check_counts()
        return payload

    # --- runs of records from the bytes ---------------------------------------------------------------

    def _feed_bytes(self, chunk: bytes) -> list[dict]:
        """Runs of whole records decoded by msgspec straight from the bytes received, no text made of
        them: from a record's start up to the last "}, {" or "},{" received, as one array (see
        `_bulk_items`). At the first thing this does not decode (the array's end, a non-object, broken
        JSON, JSON that json reads its own way, bytes that are not strict UTF-8) the text path takes
        the rest, from a record's start: it says what is wrong, or decodes it as json does."""
        buf = self._raw + chunk if self._raw else chunk
        pos = _WS_BYTES.match(buf).end()
        if pos < len(buf):
            expected = b"[" if self._state == "start" else b","
            if buf[pos:pos + 1] != expected:
                return self._to_text(buf)
            pos = _WS_BYTES.match(buf, pos + 1).end()
        if pos >= len(buf):
            self._raw = buf
            return []
        if buf[pos:pos + 1] != b"{":
            return self._to_text(buf)
        cut = max(buf.rfind(b"}, {", pos), buf.rfind(b"},{", pos))
        if cut < 0:
            if len(buf) > 4 * CHUNK_BYTES:  # no record ends in sight: the text path
                return self._to_text(buf)
            self._raw = buf
            return []
        run = buf[pos:cut + 1]
        if self.shallow:  # values left undecoded are not checked as UTF-8 by msgspec: checked here
            try:
                run.decode("utf-8")
            except UnicodeDecodeError:
                return self._to_text(buf)
        items = _decode_run(b"[" + run + b"]", self.shallow)
        if items is None:
            return self._to_text(buf)
        self._fed += cut + 1  # as if given to the text decoder: positions in later messages count them
        self._offset += cut + 1 - (len(run) - len(run.translate(None, _CONTINUATION_BYTES)))
        self._raw, self._state = buf[cut + 1:], "after"
        self.items += len(items)
        objects = [item for item in items if isinstance(item, dict)]
        self.not_objects += len(items) - len(objects)
        return objects

    def _to_text(self, data: bytes) -> list[dict]:
        """The text path from here on, given the bytes not decoded yet."""
        self._fast, self._raw = False, b""
        return self._parse(self._decode(data, final=False), final=False)

    # --- the array ----------------------------------------------------------------------------------

    def _fail(self, msg: str, pos: int) -> PayloadError:
        return PayloadError(f"the API answer is not valid JSON ({msg} at byte {self._offset + pos} of "
                            f"{self.size}): truncated or corrupted")

    def _parse(self, text: str, final: bool) -> list[dict]:
        if self._pos > len(self._text) // 2:  # drop what was parsed before adding more
            self._offset += self._pos
            self._text, self._pos = self._text[self._pos:] + text, 0
        else:
            self._text += text
        buf, pos, state, out = self._text, self._pos, self._state, []
        end = len(buf)
        if not final and end - pos < 2 * self._cut:
            return out
        while True:
            pos = _WS.match(buf, pos).end()
            if pos == end:
                if final and state != "done":
                    raise self._fail("Expecting ',' delimiter" if state == "after" else "Expecting value", pos)
                break
            char = buf[pos]
            if state == "after":
                if char == ",":
                    state, pos = "item", pos + 1
                elif char == "]":
                    state, pos = "done", pos + 1
                else:
                    raise self._fail("Expecting ',' delimiter", pos)
            elif state == "start":
                if char != "[":
                    raise self._fail("Expecting value", pos)
                state, pos = "first", pos + 1
            elif state == "done":
                raise self._fail("Extra data", pos)
            elif state == "first" and char == "]":
                state, pos = "done", pos + 1
            elif not final and self._bulk and (bulk := self._bulk_items(buf, pos, end)) is not None:
                items, pos = bulk
                self.items += len(items)
                objects = [item for item in items if isinstance(item, dict)]
                self.not_objects += len(items) - len(objects)
                out += objects
                state = "after"
            else:
                try:
                    item, stop = _DECODER.raw_decode(buf, pos)
                except json.JSONDecodeError as err:
                    if final:
                        raise self._fail(err.msg, err.pos) from None
                    self._cut = end - pos  # cut off (or broken): tried again when as much again came
                    break
                if stop == end and not final:  # a number cut off here would look complete
                    self._cut = end - pos
                    break
                self._cut = 0
                self.items += 1
                if isinstance(item, dict):
                    out.append(item)
                else:
                    self.not_objects += 1
                state, pos = "after", stop
        self._pos, self._state = pos, state
        return out

    def _bulk_items(self, buf: str, pos: int, end: int):
        """The records from `pos` up to the last "}, {" or "},{" in the text, decoded in one call
        (a JSON array of them), and where they end; None when there is no such separator or the
        text up to it is not whole records (it was inside a string or a record: lexing JSON from a
        record's start is unambiguous, so a text that decodes as an array is exactly those records).
        Then records are decoded one at a time; after a few such misses, always."""
        cut = max(buf.rfind("}, {", pos, end), buf.rfind("},{", pos, end))
        if cut < 0:
            return None
        text = "[" + buf[pos:cut + 1] + "]"
        items = _decode_run(text, self.shallow)
        if items is not None:
            return items, cut + 1
        try:
            return json.loads(text), cut + 1
        except json.JSONDecodeError:
            self._misses += 1
            self._bulk = self._misses < 3
            return None


_DECODERS = {False: msgspec.json.Decoder(), True: msgspec.json.Decoder(list[dict[str, msgspec.Raw]])}


def _decode_run(text: str | bytes, shallow: bool) -> list | None:
    """A JSON array of records decoded by msgspec (shallow: each a dict of its fields' msgspec.Raw
    JSON), or None where msgspec refuses it: JSON that json reads though the standard does not (NaN,
    a number beyond a double's range, a lone surrogate), an item that is not an object (shallow), or
    broken JSON. Then json decodes it, so every such outcome, message included, is json's.
    Where msgspec accepts the text, its values are json's (tests/test_source.py compares them)."""
    try:
        return _DECODERS[shallow].decode(text)
    except Exception:  # msgspec.DecodeError; a text that UTF-8 cannot encode; nesting too deep
        return None


def full(record: dict) -> dict:
    """A record of a shallow PayloadReader as json gives it (its Raw values decoded by json)."""
    return {k: json.loads(bytes(v)) if isinstance(v, msgspec.Raw) else v for k, v in record.items()}


def parse_whole(data: bytes):
    """json.loads, its errors said as PayloadError (for a payload that is not an array)."""
    try:
        return json.loads(data)
    except UnicodeDecodeError as err:
        if err.reason == "unexpected end of data":  # cut inside a multi-byte character
            raise PayloadError(f"the API answer ends inside a UTF-8 character (byte {err.start} of "
                               f"{len(data)}): truncated") from None
        raise PayloadError(f"the API answer is not UTF-8 text: {err}") from None
    except json.JSONDecodeError as err:
        raise PayloadError(
            f"the API answer is not valid JSON ({err.msg} at byte {err.pos} of {len(data)}): "
            "truncated or corrupted"
        ) from None


def parse_payload(data: bytes, min_records: int = 1) -> list[dict]:
    """The payload as a list of records, or PayloadError saying what is wrong with it."""
    reader = PayloadReader(min_records)
    return reader.feed(data) + reader.close()


def project(records: list[dict], fields: tuple[str, ...] = SOURCE_FIELDS) -> list[dict]:
    """Keep only the named fields of each record, as the API does for `?fields=`."""
    return [{k: r[k] for k in fields if k in r} for r in records]
