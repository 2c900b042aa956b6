"""lib.outbox: what is put is sent in order in the background, to real local HTTP servers; flushing
waits at most what is left of the budget, gives up on the rest for good and says so once."""

from __future__ import annotations

import json
import logging
import time
import urllib.request

import pytest

from lib import outbox
from tests.sinks import HttpSink, timed, wait_for


@pytest.fixture
def slow():
    sink = HttpSink(delay=0.8)
    yield sink
    sink.close()


def poster(port: int, n: int):
    def send():
        request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=json.dumps(n).encode(), method="POST")
        urllib.request.urlopen(request, timeout=10).close()
    return send


def test_what_is_put_is_sent_in_order_without_the_caller_waiting(caplog):
    sink = HttpSink(delay=0.05)
    try:
        box = outbox.get("test message", f"http://127.0.0.1:{sink.port}/")
        caplog.set_level(logging.INFO)
        _, seconds = timed(lambda: [box.put(f"m{n}", poster(sink.port, n)) for n in range(8)], limit=5)
        assert seconds < 0.2  # eight answers take 0.4 s: none was waited for
        [outcome] = outbox.flush_all()
        assert outcome.delivered == [f"m{n}" for n in range(8)] and outcome.not_delivered == []
        assert [p["json"] for p in sink.posts] == list(range(8))
        assert f"8 test messages sent to http://127.0.0.1:{sink.port}/" in caplog.messages
        assert outbox.flush_all() == []  # a new batch starts empty
    finally:
        sink.close()


def test_a_flush_gives_up_at_the_budget_and_what_it_gave_up_is_never_sent(slow, caplog):
    box = outbox.get("test message", f"http://127.0.0.1:{slow.port}/")
    for n in range(5):
        box.put(f"m{n}", poster(slow.port, n))
    caplog.set_level(logging.INFO)
    [outcome], seconds = timed(outbox.flush_all, limit=outbox.BUDGET_S + 5)
    assert outbox.BUDGET_S - 0.1 <= seconds <= outbox.BUDGET_S + 0.2
    assert outcome.delivered + outcome.not_delivered == [f"m{n}" for n in range(5)]
    assert 1 <= len(outcome.delivered) <= 3 and outcome.error.startswith("no answer within")
    # The one on its way at the deadline may still arrive; those behind it are never sent.
    wait_for(lambda: len(slow.posts) > len(outcome.delivered), timeout=1.5)
    time.sleep(1.0)
    assert len(slow.posts) <= len(outcome.delivered) + 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"{len(outcome.not_delivered)} of 5 test messages to http://127.0.0.1:{slow.port}/ were "
                        f"not delivered (the run's outcome is unchanged): {outcome.error}; not delivered: "
                        + ", ".join(outcome.not_delivered)]


def test_what_a_destination_says_is_the_reason_and_one_flush_waits_for_all_destinations(slow):
    refusing = outbox.get("test message", "nowhere")

    def refuse():
        raise outbox.NotDelivered("refused")

    refusing.put("r0", refuse)
    for n in range(3):
        outbox.get("test message", f"http://127.0.0.1:{slow.port}/").put(f"m{n}", poster(slow.port, n))
    outcomes, seconds = timed(outbox.flush_all, limit=outbox.BUDGET_S + 5)
    assert seconds <= outbox.BUDGET_S + 0.2  # one budget for every destination, not one each
    by_destination = {o.destination: o for o in outcomes}
    assert {k: v for k, v in by_destination["nowhere"].record().items() if k != "waited_s"} == {
        "what": "test message", "destination": "nowhere", "delivered": 0, "not_delivered": ["r0"],
        "error": "refused"}
    assert sum(o.waited_s for o in outcomes) <= outbox.BUDGET_S + 0.05


def test_time_spent_preparing_counts_against_the_budget(slow):
    with outbox.charged():
        time.sleep(1.5)
        outbox.get("test message", f"http://127.0.0.1:{slow.port}/").put("m0", poster(slow.port, 0))
        outbox.get("test message", f"http://127.0.0.1:{slow.port}/").put("m1", poster(slow.port, 1))
    [outcome], seconds = timed(outbox.flush_all, limit=outbox.BUDGET_S + 5)
    assert seconds <= outbox.BUDGET_S - 1.5 + 0.2
    assert outcome.not_delivered  # 1.6 s of answers do not fit in what was left
