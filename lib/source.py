"""The REST Countries v3.1 source: a careful HTTP client, payload checks and the bundled snapshot."""

from __future__ import annotations

import email.utils
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from urllib.parse import parse_qs, urlsplit

import requests
import tenacity

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
    data: bytes
    origin: str  # "api" or "snapshot"
    url: str
    attempts: list[dict] = field(default_factory=list)
    fallback_reason: str | None = None


def check_url(url: str) -> str:
    """Refuse a URL that the live API would answer with 400, before sending it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SourceError(f"API URL {url!r} is not an http(s) URL")
    if parts.path.rstrip("/").endswith("/all"):
        fields = [f for f in ",".join(parse_qs(parts.query).get("fields", [])).split(",") if f.strip()]
        if not fields or len(fields) > MAX_SOURCE_FIELDS:
            raise SourceError(
                f"API URL {url!r} must name 1 to {MAX_SOURCE_FIELDS} fields (?fields=a,b,...): "
                "the REST Countries API answers /v3.1/all without them with HTTP 400"
            )
    return url


def short_error(err: Exception) -> str:
    """A connection error in one readable phrase (requests' own text nests several layers)."""
    text = str(err)
    for pattern in (r"Failed to resolve '[^']+'", r"Connection refused", r"Read timed out",
                    r"timed out", r"Connection reset by peer", r"Remote end closed connection"):
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


def _get(http: requests.Session, url: str, timeout: tuple[float, float], attempts: list[dict]) -> requests.Response:
    """One request. Returns a good answer, raises HttpError for a final one, _Retryable otherwise."""
    attempt = len(attempts) + 1
    sent = time.monotonic()
    try:
        response = http.get(url, timeout=timeout, headers={"Accept": "application/json"})
    except (requests.ConnectionError, requests.Timeout) as err:
        attempts.append({"attempt": attempt, "error": type(err).__name__, "seconds": round(time.monotonic() - sent, 3)})
        raise _Retryable(short_error(err)) from None
    attempts.append({"attempt": attempt, "status": response.status_code, "seconds": round(time.monotonic() - sent, 3)})
    if response.status_code < 400:
        log.info("GET %s -> %s (%d bytes, attempt %d)", url, response.status_code, len(response.content), attempt)
        return response
    body = response.text[:2000]
    if response.status_code != 429 and response.status_code < 500:
        raise HttpError(f"GET {url} answered HTTP {response.status_code}: {body}")
    raise _Retryable(f"HTTP {response.status_code}: {body[:300]}",
                     _retry_after(response) if response.status_code == 429 else None)


def fetch(url: str, *, connect_timeout: float = 5.0, read_timeout: float = 30.0, max_attempts: int = 4,
          backoff: float = 0.5, max_backoff: float = 8.0, max_total_seconds: float = 60.0,
          session: requests.Session | None = None) -> Fetched:
    """GET with timeouts and retries (a tenacity policy): exponential backoff with jitter on connection
    errors, timeouts, 5xx and 429 (honouring Retry-After), no retry that would end past
    `max_total_seconds`. Any other 4xx is final and its body is part of the error."""
    check_url(url)
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
        log.warning("GET %s failed (%s); retry %d in %.1fs", url, state.outcome.exception(),
                    state.attempt_number + 1, state.upcoming_sleep)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(_Retryable),
        wait=wait,
        stop=tenacity.stop_after_attempt(max_attempts) | tenacity.stop_before_delay(max_total_seconds),
        before_sleep=before_sleep,
    )
    try:
        response = retrying(_get, http, url, (connect_timeout, read_timeout), attempts)
    except tenacity.RetryError as err:
        problem = str(err.last_attempt.exception())
        if len(attempts) < max_attempts:
            problem += f" (next retry in {upcoming[-1]:.1f}s would pass the {max_total_seconds:.0f}s budget)"
        unreachable = Unreachable(f"GET {url} failed after {len(attempts)} attempt(s): {problem}")
        unreachable.attempts = attempts  # shown by stage 1 when the snapshot is used instead
        raise unreachable from None
    return Fetched(response.content, "api", url, attempts)


def snapshot_bytes() -> bytes:
    return resources.files("lib.data").joinpath(SNAPSHOT).read_bytes()


def fetch_or_snapshot(url: str, *, fallback: bool, **fetch_options) -> Fetched:
    """Fetch from the API; when it cannot be reached and fallback is allowed, use the bundled
    snapshot and say so. An API that answers with an error is never papered over."""
    try:
        return fetch(url, **fetch_options)
    except Unreachable as err:
        if not fallback:
            raise
        log.warning("API unreachable, USING THE BUNDLED SNAPSHOT instead: %s", err)
        return Fetched(snapshot_bytes(), "snapshot", url, getattr(err, "attempts", []), fallback_reason=str(err))


def parse_payload(data: bytes, min_records: int = 1) -> list[dict]:
    """The payload as a list of records, or PayloadError saying what is wrong with it."""
    head = data[:200].lstrip().lower()
    if head.startswith((b"<!doctype", b"<html", b"<")):
        raise PayloadError("the API answered with an HTML page, not JSON: " + data[:120].decode("utf-8", "replace"))
    try:
        payload = json.loads(data)
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
    if not isinstance(payload, list):
        raise PayloadError(f"the API answer is a JSON {type(payload).__name__}, not a list of countries")
    if not payload:
        raise PayloadError("the API answered with an empty list: no countries")
    not_objects = sum(1 for r in payload if not isinstance(r, dict))
    if not_objects:
        raise PayloadError(f"{not_objects} of {len(payload)} items in the API answer are not JSON objects")
    if len(payload) < min_records:
        raise PayloadError(
            f"the API answered with {len(payload)} records, fewer than min_records={min_records}"
        )
    return payload


def project(records: list[dict], fields: tuple[str, ...] = SOURCE_FIELDS) -> list[dict]:
    """Keep only the named fields of each record, as the API does for `?fields=`."""
    return [{k: r[k] for k in fields if k in r} for r in records]
