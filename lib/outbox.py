"""Side channels that never hold a run: what goes to a lineage service or an alert destination is
sent in the background, and a run waits for it at most `BUDGET_S`, whatever the destination does.

Each destination has one outbox per process. What is put in it is sent in order by the outbox's own
daemon thread, so whoever puts never waits. Whoever ends a run calls `flush_all()`: it waits for what
is still on its way for what is left of `BUDGET_S` once the time the callers spent preparing and
putting (`charged`) is counted, then gives up on the rest: what was not sent by then never will be.
It logs one line per destination that missed anything (not one per event), and returns the outcomes
for the run's record. A process that exits without flushing flushes at exit, within the same budget;
a thread still waiting for an answer does not keep the process alive.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

BUDGET_S = 2.0  # the most a run waits for all its side channels together


class NotDelivered(Exception):
    """A destination took the message but said no; the text is the reason, in a phrase."""


@dataclass
class Outcome:
    """What became of one batch put in one destination's outbox."""

    what: str  # what was sent, singular: "OpenLineage event", "alert"
    destination: str  # where, without secrets (a URL in its masked form)
    delivered: list[str] = field(default_factory=list)
    not_delivered: list[str] = field(default_factory=list)
    error: str | None = None  # the first failure, or the deadline
    waited_s: float = 0.0  # how long flushing waited for it

    def record(self) -> dict:
        """The outcome as the run record keeps it."""
        return {"what": self.what, "destination": self.destination, "delivered": len(self.delivered),
                "not_delivered": self.not_delivered, "error": self.error, "waited_s": round(self.waited_s, 2)}

    def log(self) -> None:
        """One line: sent, or what was not delivered and why."""
        total = len(self.delivered) + len(self.not_delivered)
        if not self.not_delivered:
            log.info("%s sent to %s", self.what if total == 1 else f"{total} {self.what}s", self.destination)
        elif total == 1:
            log.warning("%s to %s was not delivered (the run's outcome is unchanged): %s",
                        self.what, self.destination, self.error)
        else:
            log.warning("%d of %d %ss to %s were not delivered (the run's outcome is unchanged): %s; "
                        "not delivered: %s", len(self.not_delivered), total, self.what, self.destination,
                        self.error, ", ".join(self.not_delivered))


class _Item:
    __slots__ = ("label", "send", "done", "error", "given_up")

    def __init__(self, label: str, send: Callable[[], object]):
        self.label, self.send = label, send
        self.done = threading.Event()
        self.error: str | None = None
        self.given_up = False


def _reason(err: BaseException) -> str:
    text = str(err) if isinstance(err, NotDelivered) else f"{type(err).__name__}: {err}"
    return text if len(text) <= 200 else text[:200] + "…"


class Outbox:
    """One destination's queue and the daemon thread that empties it, in order."""

    def __init__(self, what: str, destination: str):
        self.what, self.destination = what, destination
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._batch: list[_Item] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def put(self, label: str, send: Callable[[], object]) -> None:
        """Queue `send` (it raises when the destination did not take it); never waits."""
        item = _Item(label, send)
        with self._lock:
            self._batch.append(item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=f"outbox {self.destination}", daemon=True)
                self._thread.start()
        self._queue.put(item)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item.given_up:
                continue
            try:
                item.send()
            except BaseException as err:  # noqa: BLE001 - whatever a destination does is an outcome
                item.error = _reason(err)
            item.done.set()

    def flush(self, deadline: float) -> Outcome | None:
        """Wait for this batch until `deadline` (time.monotonic()), give up on the rest and start a new
        batch; None when nothing was put since the last flush."""
        with self._lock:
            batch, self._batch = self._batch, []
        if not batch:
            return None
        started = time.monotonic()
        batch[-1].done.wait(max(0.0, deadline - started))  # sent in order: the last one is the last done
        outcome = Outcome(self.what, self.destination)
        for item in batch:
            item.given_up = True  # the thread skips it if it has not started it yet
            if item.done.is_set() and item.error is None:
                outcome.delivered.append(item.label)
            else:
                outcome.not_delivered.append(item.label)
                outcome.error = outcome.error or item.error
        if outcome.not_delivered and outcome.error is None:
            outcome.error = f"no answer within the run's {BUDGET_S:g} s for side channels"
        outcome.waited_s = time.monotonic() - started
        return outcome


_outboxes: dict[tuple[str, str], Outbox] = {}
_lock = threading.Lock()
_spent = 0.0  # seconds callers spent putting, since the last flush


def get(what: str, destination: str) -> Outbox:
    """The process's outbox for `what` to `destination`."""
    with _lock:
        box = _outboxes.get((what, destination))
        if box is None:
            box = _outboxes[(what, destination)] = Outbox(what, destination)
        return box


@contextmanager
def charged():
    """Time spent in here (preparing and putting) counts against the budget of the next flush."""
    global _spent
    started = time.monotonic()
    try:
        yield
    finally:
        with _lock:
            _spent += time.monotonic() - started


def flush_all() -> list[Outcome]:
    """Wait for every outbox's batch, all of them within what is left of `BUDGET_S`; log one line
    per destination; returns the outcomes (none for an outbox nobody put anything in)."""
    global _spent
    with _lock:
        boxes = list(_outboxes.values())
        deadline = time.monotonic() + max(0.0, BUDGET_S - _spent)
        _spent = 0.0
    outcomes = [o for o in (box.flush(deadline) for box in boxes) if o is not None]
    for outcome in outcomes:
        outcome.log()
    return outcomes


atexit.register(flush_all)
