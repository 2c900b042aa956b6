"""Text from data or records made safe to print on a terminal: what the command line prints of keys,
values, run records and errors goes through `safe`, so a country named with a carriage return, an
escape sequence or a right-to-left override shows those characters as escapes instead of acting on
the terminal (moving the cursor, recolouring, reordering what follows). `shorten` cuts a line that must
stay short (an alert, a log line, an error in a table) at a word, never in the middle of one."""

from __future__ import annotations

import unicodedata

# Control (Cc) and format (Cf) characters, line and paragraph separators, lone surrogates (which cannot
# even be encoded to print them). The joiners are format characters that only join what is printed
# (emoji sequences, Persian, Indic scripts): they stay.
ESCAPED = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
KEPT = frozenset({"\u200c", "\u200d"})
NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}


def _escape(c: str) -> str:
    if c in NAMED:
        return NAMED[c]
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def safe(text, newlines: bool = False) -> str:
    """`text` (any value, as its str) with every control and format character escaped as Python
    writes it (`\\r`, `\\x1b`, `\\u202e`); printable text of every script as it is. `newlines=True`
    keeps line breaks, for a message of several lines."""
    text = str(text)
    if text.isprintable():  # the usual case: nothing to look at character by character
        return text
    return "".join(_escape(c) if c not in KEPT and unicodedata.category(c) in ESCAPED
                   and not (newlines and c == "\n") else c for c in text)


def shorten(text: str, limit: int) -> str:
    """`text` in at most `limit` characters: whole when it fits, else cut at the last space that
    leaves at least half of it, with "…" (a word is never cut short unless it alone is longer than
    half the line, as a long URL may be)."""
    if len(text) <= limit:
        return text
    head = text[:limit - 1]
    space = head.rfind(" ")
    if space >= limit // 2:
        head = head[:space]
    return head.rstrip(" ,;:") + "…"
