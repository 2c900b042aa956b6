"""lib/terminal.py: text from data or records made safe to print: control and format characters
escaped, printable text of any script as it is."""

from __future__ import annotations

import pytest

from lib import terminal


@pytest.mark.parametrize("text, shown", [
    ("Carriage\rReturn", "Carriage\\rReturn"),
    ("Line\nFeed\tTab", "Line\\nFeed\\tTab"),
    ("Esc\x1b[31mRed\x1b[0m", "Esc\\x1b[31mRed\\x1b[0m"),
    ("Right\u202eto left", "Right\\u202eto left"),  # a bidirectional override (Cf)
    ("\u2066isolate\u2069 \u200emark\u200f", "\\u2066isolate\\u2069 \\u200emark\\u200f"),
    ("\ufeffBom and zero\u200bwidth", "\\ufeffBom and zero\\u200bwidth"),
    ("nul\x00 del\x7f c1\x85\x9b", "nul\\x00 del\\x7f c1\\x85\\x9b"),
    ("bell\a back\b form\f vt\v", "bell\\x07 back\\x08 form\\x0c vt\\x0b"),
    ("lines\u2028para\u2029", "lines\\u2028para\\u2029"),
    ("lone \ud800 surrogate", "lone \\ud800 surrogate"),  # printing it would raise
    ("tag \U000e0041", "tag \\U000e0041"),  # a Cf beyond the BMP
    # Printable text of any script stays as it is; joiners too (emoji sequences, Persian need them).
    ("Ünïcödé 🏳️‍🌈 中文 Côte d’Ivoire", "Ünïcödé 🏳️‍🌈 中文 Côte d’Ivoire"),
    ("می\u200cخواهم", "می\u200cخواهم"),
    ("C:\\path \\r as typed", "C:\\path \\r as typed"),
    ("", ""),
])
def test_control_and_format_characters_are_escaped(text, shown):
    assert terminal.safe(text) == shown
    shown.encode("utf-8")  # printable on any UTF-8 terminal


def test_line_breaks_may_be_kept_for_a_message_of_several_lines():
    assert terminal.safe("first\r\nsecond\x1b[2J\nthird", newlines=True) == "first\\r\nsecond\\x1b[2J\nthird"


def test_anything_is_shown_as_its_text():
    assert terminal.safe(None) == "None" and terminal.safe(42) == "42"


def test_a_short_line_is_kept_whole_and_a_long_one_cut_at_a_word():
    assert terminal.shorten("run 01_ingest failed", 20) == "run 01_ingest failed"
    assert terminal.shorten("run 01_ingest failed", 16) == "run 01_ingest…"
    assert terminal.shorten("the current transaction is aborted", 22) == "the current…"
    assert terminal.shorten("a list: one, two, three", 15) == "a list: one…"  # no dangling comma


def test_only_a_word_longer_than_half_the_line_is_cut_inside():
    url = "http://127.0.0.1:1/v3.1/all?fields=" + "name," * 20
    cut = terminal.shorten("GET " + url, 40)
    assert len(cut) == 40 and cut.startswith("GET http://") and cut.endswith("…")
