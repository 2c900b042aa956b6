"""A real local HTTP server that answers like the REST Countries v3.1 API, with faults on demand.

It serves the bundled snapshot and follows the live endpoint's rules: `/v3.1/all` without `fields`,
with a blank name or with more than 10 names answers 400 with the API's own message; with `fields`,
each record holds only those keys. Tests queue scripted answers (503, 429 with Retry-After, HTML,
truncated JSON, ...) that are served before the normal behaviour resumes.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from lib import contract, source

FIELDS_MESSAGE = {"status": 400, "message": "'fields' query not specified or you're requesting more than 10 fields"}


@dataclass
class Scripted:
    status: int
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    delay: float = 0.0


class CopiesBody:
    """`copies` copies of the records as one JSON array, each copy after the first with unique names
    ("France #2"), produced piece by piece: the body of a million records is never built in memory.
    Each record is encoded once; a copy only splices the new name in."""

    MARK = "\u0000name\u0000"

    def __init__(self, records: list[dict], fields: tuple[str, ...], copies: int):
        self.copies, self.parts = copies, []
        for record in source.project(records, fields):
            name = (record.get("name") or {}).get("common") if isinstance(record.get("name"), dict) else None
            if name is None:
                self.parts.append((json.dumps(record, ensure_ascii=False).encode(), None, b""))
                continue
            marked = {**record, "name": {**record["name"], "common": self.MARK}}
            head, _, tail = json.dumps(marked, ensure_ascii=False).partition(json.dumps(self.MARK))
            self.parts.append((head.encode(), name, tail.encode()))

    def _copy(self, i: int):
        for head, name, tail in self.parts:
            if name is None:
                yield head
            else:
                yield head + json.dumps(name if i == 0 else f"{name} #{i}", ensure_ascii=False).encode() + tail

    def __len__(self) -> int:
        per_copy = sum(len(h) + len(t) for h, n, t in self.parts)
        names = sum(len(json.dumps(n if i == 0 else f"{n} #{i}", ensure_ascii=False).encode())
                    for i in range(self.copies) for _, n, _ in self.parts if n is not None)
        items = self.copies * len(self.parts)
        return 2 + per_copy * self.copies + names + max(items - 1, 0) * 2

    def __iter__(self):
        yield b"["
        first = True
        for i in range(self.copies):
            chunk = []
            for item in self._copy(i):
                chunk.append(item if first else b", " + item)
                first = False
            yield b"".join(chunk)
        yield b"]"


class RestCountriesServer:
    def __init__(self, records: list[dict] | None = None, copies: int = 1):
        self.records = records if records is not None else json.loads(source.snapshot_bytes())
        self.copies = copies  # the records served this many times, with unique names (benchmarks)
        self.payload: bytes | None = None  # served instead of the records when set
        self.script: list[Scripted] = []
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/v3.1/all?fields={','.join(contract.SOURCE_FIELDS)}"

    def reset(self) -> None:
        with self._lock:
            self.records = json.loads(source.snapshot_bytes())
            self.payload = None
            self.copies = 1
            self.script.clear()
            self.requests.clear()

    def queue(self, *answers: Scripted) -> None:
        with self._lock:
            self.script.extend(answers)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _send(self, handler, status: int, body: bytes, headers: dict) -> None:
        handler.send_response(status)
        for k, v in {"Content-Type": "application/json", **headers}.items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _handle(self, handler) -> None:
        with self._lock:
            self.requests.append({"path": handler.path, "at": time.monotonic()})
            scripted = self.script.pop(0) if self.script else None
            records, payload = self.records, self.payload
        if scripted is not None:
            if scripted.delay:
                time.sleep(scripted.delay)
            return self._send(handler, scripted.status, scripted.body, scripted.headers)
        parts = urlsplit(handler.path)
        if parts.path.rstrip("/") != "/v3.1/all":
            return self._send(handler, 404, b'{"status":404,"message":"Not Found"}', {})
        names = [f for f in ",".join(parse_qs(parts.query).get("fields", [])).split(",")]
        if not parts.query or not any(n.strip() for n in names) or any(not n.strip() for n in names) or len(names) > 10:
            return self._send(handler, 400, json.dumps(FIELDS_MESSAGE).encode(), {})
        if payload is None and self.copies > 1:
            return self._stream(handler, CopiesBody(records, tuple(names), self.copies))
        body = payload if payload is not None else json.dumps(
            source.project(records, tuple(names)), ensure_ascii=False).encode("utf-8")
        return self._send(handler, 200, body, {"Cache-Control": "public, max-age=3600"})

    def _stream(self, handler, body: CopiesBody) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        try:
            for chunk in body:
                handler.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading (a probe)
            pass
