"""Real local receivers for what the pipeline sends out: an HTTP server that records every POST (a
lineage service such as Marquez, or a JSON webhook; it may answer slowly or with an error), a server
that accepts connections and never answers, and an SMTP server (aiosmtpd) that records every mail.
All listen on 127.0.0.1 only, on a free port."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HttpSink:
    """Records each POST: path, headers and JSON body; answers `status` (200 by default), after
    `delay` seconds."""

    def __init__(self, status: int = 200, delay: float = 0.0):
        self.status = status
        self.delay = delay
        self.posts: list[dict] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    parsed = json.loads(body)
                except ValueError:
                    parsed = None
                sink.posts.append({"path": self.path, "headers": dict(self.headers), "body": body, "json": parsed})
                time.sleep(sink.delay)
                self.send_response(sink.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class HangingSink:
    """Accepts every connection and never answers (a service stuck behind a load balancer); counts
    the connections it took. Closing it drops them."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.connections.append(conn)

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self.listener.close()
        for conn in self.connections:
            conn.close()


class SmtpSink:
    """A real SMTP server (aiosmtpd) keeping every message it accepts."""

    def __init__(self):
        from aiosmtpd.controller import Controller

        self.messages: list = []
        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                sink.messages.append(envelope)
                return "250 OK"

        self.controller = Controller(Handler(), hostname="127.0.0.1", port=free_port())
        self.controller.start()

    @property
    def port(self) -> int:
        return self.controller.port

    def close(self) -> None:
        self.controller.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    return free_port()


def wait_for(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


# Destinations that misbehave, each the way a real one does: nothing listening, a connection taken and
# never answered, an answer after a while, an error answer.
MISBEHAVING = ("refusing", "hanging", "slow", "failing")
SLOW_S = 0.5  # the slow destination's time to answer each request


class Misbehaving:
    """One of MISBEHAVING on a loopback port; `close()` stops it."""

    def __init__(self, kind: str):
        self.kind = kind
        self.sink = {"refusing": lambda: None, "hanging": HangingSink, "slow": lambda: HttpSink(delay=SLOW_S),
                     "failing": lambda: HttpSink(status=500)}[kind]()
        self.port = self.sink.port if self.sink else closed_port()

    def close(self) -> None:
        if self.sink:
            self.sink.close()


def timed(call, limit: float):
    """(what `call()` returns, seconds it took); fails as soon as it has run `limit` seconds (the call
    goes on in a daemon thread), so a test of a bound fails in bounded time."""
    result, failure = [], []

    def run():
        try:
            result.append(call())
        except BaseException as err:  # noqa: BLE001 - handed to the test
            failure.append(err)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    seconds = time.monotonic() - started
    assert not thread.is_alive(), f"still running after {limit:g} s"
    if failure:
        raise failure[0]
    return result[0], seconds
