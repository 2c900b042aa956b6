"""COPY through a pipe: a thread produces (or parses) rows while PostgreSQL copies (or renders) the
others, so that the server and this process each take a core (lib/db_load.py's load, stage 3's
COPY of the silver rows, stage 4's export)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading

import psycopg2


def _piped(write):
    """Start `write(sink)` in a thread writing into a pipe; its reading end, the thread, and the dict
    that gets write's return value ("result") or its error ("error")."""

    read_fd, write_fd = os.pipe()
    with contextlib.suppress(ImportError, OSError, AttributeError):  # a 1 MiB pipe (Linux), fewer wake-ups

        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    reader, writer = open(read_fd, "rb", buffering=1 << 20), open(write_fd, "wb", buffering=1 << 16)
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = write(writer)
        except BaseException as err:  # handed to the reading thread
            outcome["error"] = err
        finally:
            with contextlib.suppress(OSError):
                writer.close()

    thread = threading.Thread(target=run, name="pipe-writer", daemon=True)
    thread.start()
    return reader, thread, outcome


@contextlib.contextmanager
def streamed(copy):
    """Run `copy(sink)` (a COPY ... TO STDOUT into `sink`) in a thread writing into a pipe, and yield
    the pipe's reading end, so the rows are parsed while PostgreSQL still renders them (the server
    and the parse each take a core). The reader must be read to its end. An error of the COPY is
    raised once the reading is done (before the reader's own, which a cut-off stream would cause);
    leaving early closes the pipe, which ends the COPY. `copy`'s return value ends up in the dict
    yielded beside the reader, under "result"."""
    reader, thread, outcome = _piped(copy)
    try:
        yield reader, outcome
    except BaseException:
        reader.close()
        thread.join()
        if isinstance(outcome.get("error"), psycopg2.Error):
            raise outcome["error"] from None  # the server's error, not the parse of a cut-off stream
        raise
    reader.close()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]


class _Fed:
    """The reading end of `fed`'s pipe: its end raises the producer's error, so a COPY ... FROM STDIN
    reading it fails (and its transaction rolls back) instead of loading a cut-off batch."""

    def __init__(self, reader, thread, outcome):
        self.reader, self.thread, self.outcome = reader, thread, outcome

    def read(self, size: int = -1) -> bytes:
        chunk = self.reader.read(size)
        if not chunk:
            self.thread.join()
            if "error" in self.outcome:
                raise self.outcome["error"]
        return chunk


@contextlib.contextmanager
def fed(produce):
    """Run `produce(sink)` (writing a CSV for `merge`, say) in a thread writing into a pipe, and yield
    a reader of it for COPY ... FROM STDIN, so the rows are produced while PostgreSQL copies the
    previous ones; and a dict that gets produce's return value under "result". The producer's
    error wins over the reader's (a COPY failed by it)."""
    reader, thread, outcome = _piped(produce)
    try:
        yield _Fed(reader, thread, outcome), outcome
    except BaseException:
        reader.close()  # a producer still writing stops (broken pipe)
        thread.join()
        if "error" in outcome and not isinstance(outcome["error"], BrokenPipeError):
            raise outcome["error"] from None
        raise
    reader.close()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
