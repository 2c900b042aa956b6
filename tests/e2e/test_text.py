"""Any text the API sends survives every hop byte for byte (silver in both formats, PostgreSQL, the
cloud export, gold), or its record is quarantined with a reason naming the field: hostile strings
served by the local API server, checked at each hop of a real run."""

from __future__ import annotations

import copy
import json
import unicodedata

import pytest

from lib import db_read, formats, layout, storage, terminal
from tests.notebooks.helpers import by_name, manifest, read_object, renamed, snapshot

LONG = "Long " + "ẞ€x" * 40_000  # 120 005 characters, multi-byte
HOSTILE = {  # name → (official name, flag alt text, capital): every hostile character somewhere
    "Carriage\rReturn": ("Republic of\rCR", "a flag\r", ["Cap\rital"]),
    "Line\nFeed": ("Republic of\nLF", "\nflag", ["Cap\nital"]),
    "Crlf\r\nLand": ("Republic of\r\nCRLF", "flag\r\n", ["Cap\r\nital"]),
    "Tab\tLand": ("Republic\tof Tab", "\ttab\t", ["\tCapital"]),
    'Quote "Land"': ('Republic of "Quotes" and \'single\'', '"', ['"Capital"']),
    "Back\\slash \\N \\. Land": ("Republic of \\\\ and \\n", "\\", ["\\.", "C:\\Capital"]),
    "\ufeffBom Land": ("\ufeffRepublic of BOM", "\ufeff", ["\ufeffCapital"]),
    "Long Land": (LONG, LONG, [LONG, LONG]),
    "Ünïcödé 🏳️‍🌈 Land": ("Republic of 🏳️‍🌈", "中文", ["Ünï"]),
    "Esc\x1b[31mRed\u202eLand": ("Republic of \x1b[0m", "\u202eflag", ["Cap\x1b]0;title\x07ital"]),
}
# Field → value that cannot survive a hop: NUL (PostgreSQL text), a lone surrogate (UTF-8).
UNSTORABLE = {
    "Nul Official": ("name_official", "contains a NUL character"),
    "Nul\x00Name": ("name_common", "contains a NUL character"),
    "Surrogate Capital": ("capital", "contains a lone surrogate"),
    "Surrogate\ud800Name": ("name_common", "contains a lone surrogate"),
    LONG: ("name_common", "is 280005 bytes long, more than the 2000 a key may have"),
}


def hostile_payload() -> tuple[bytes, list[dict]]:
    records = snapshot()
    base = by_name(records)["Fiji"]
    for name, (official, alt, capital) in HOSTILE.items():
        record = renamed(base, name)
        record["name"]["official"] = official
        record["flags"] = {**record["flags"], "alt": alt}
        record["capital"] = capital
        records.append(record)
    for name, (field, _) in UNSTORABLE.items():
        record = renamed(base, name)
        if name == "Nul Official":
            record["name"]["official"] = "Republic\x00of Nul"
        elif name == "Surrogate Capital":
            record["capital"] = ["Cap\ud800ital"]
        records.append(record)
    # Two different copies of one key: neither wins, whatever the order.
    twin = copy.deepcopy(by_name(records)["Chile"])
    twin["population"] += 1
    records.insert(0, twin)
    # JSON escapes carry the lone surrogates, as a server may send them.
    return json.dumps(records, ensure_ascii=True).encode("ascii"), records


def expected_row(name: str) -> dict:
    official, alt, capital = HOSTILE[name]
    return {"name_common": name, "name_official": official, "flag_alt": alt, "capital": capital}


def rows_of(frame) -> dict[str, dict]:
    frame = frame.set_index("name_common")
    return {name: {"name_common": name, "name_official": frame.at[name, "name_official"],
                   "flag_alt": frame.at[name, "flag_alt"], "capital": list(frame.at[name, "capital"])}
            for name in HOSTILE if name in frame.index}


@pytest.mark.parametrize("silver_format", ["parquet", "csv"])
def test_hostile_text_round_trips_every_hop_or_is_quarantined_by_name(
        run_pipeline, settings, s3, pg, api, unique, silver_format):
    table, run_id = f"t_{unique}", f"text-{silver_format}-{unique}"
    api.payload, records = hostile_payload()
    res = run_pipeline("--run-id", run_id, "-p", f"table={table}", "-p", f"silver_format={silver_format}",
                       "-p", "max_invalid_fraction=0.1")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    saved = manifest(settings, run_id)
    expected = {name: expected_row(name) for name in HOSTILE}

    # Quarantine: the unstorable records, each with a reason naming the field; both Chiles.
    clean_details = saved["stages"]["02_clean"]["details"]
    assert clean_details["duplicates"] == {"Chile": {"copies": 2, "outcome": "different values: all quarantined"}}
    quarantine_key = next(o["key"] for o in saved["stages"]["02_clean"]["objects"] if o["key"].startswith("quarantine/"))
    quarantine = read_object(s3, settings.clean_bucket, quarantine_key)
    assert len(quarantine) == len(UNSTORABLE) + 2
    by_source = {json.loads(src)["name"]["common"]: reason for src, reason in zip(quarantine["source"], quarantine["reasons"])}
    for name, (field, why) in UNSTORABLE.items():
        assert by_source[name].startswith(f"{field} {why}"), by_source[name]
    assert clean_details["clean_rows"] == 249 + len(HOSTILE)

    # Silver (the format asked for), byte for byte.
    obj = next(o for o in saved["stages"]["02_clean"]["objects"] if layout.is_clean(o["key"]))
    assert obj["key"].endswith(f".{silver_format}")
    silver = formats.of_key(obj["key"]).decode(storage.get_bytes(s3, obj["bucket"], obj["key"])[0])
    assert rows_of(silver) == expected
    # PostgreSQL.
    assert rows_of(db_read.current(pg, "public", table)) == expected
    # The cloud export (CSV from COPY).
    export = saved["stages"]["04_export"]["objects"][0]
    cloud = storage.cloud_client(settings.cloud)
    assert rows_of(formats.CSV.decode(storage.get_bytes(cloud, export["bucket"], export["key"])[0])) == expected
    # Gold.
    gold = next(o for o in saved["stages"]["05_gold"]["objects"] if o["key"].startswith("countries/"))
    assert rows_of(formats.of_key(gold["key"]).decode(storage.get_bytes(s3, gold["bucket"], gold["key"])[0])) == expected
    assert saved["status"] == "succeeded"
    assert all(row["status"] in ("ok", "-") for row in saved["reconciliation"])


def raw_controls(text: str) -> set[str]:
    """The control and format characters a terminal would act on (line breaks and joiners aside)."""
    return {c for c in text if unicodedata.category(c) in ("Cc", "Cf") and c not in "\n\u200c\u200d"}


def test_the_command_line_prints_hostile_text_escaped(run_pipeline, api, unique):
    """`diff` and `runs` print keys and records with their control characters escaped (a carriage return,
    a colour, a right-to-left override), as does a run whose stage fails on what the API sent."""
    table, before, after = f"t_{unique}", f"plain-{unique}", f"hostile-{unique}"
    res = run_pipeline("--run-id", before, "-p", f"table={table}")
    assert res.returncode == 0, res.stderr[-3000:]
    api.payload, _ = hostile_payload()
    res = run_pipeline("--run-id", after, "-p", f"table={table}", "-p", "max_invalid_fraction=0.1")
    assert res.returncode == 0, res.stderr[-3000:]

    diff = run_pipeline("diff", before, after)
    assert diff.returncode == 0, diff.stderr
    added = [line for line in diff.stdout.splitlines() if line.startswith("+ ")]
    assert sorted(added) == sorted(f"+ {terminal.safe(name)}" for name in HOSTILE)
    assert "+ Carriage\\rReturn" in added and "+ Esc\\x1b[31mRed\\u202eLand" in added
    assert "+ Ünïcödé 🏳️‍🌈 Land" in added  # printable text as it is
    listed = run_pipeline("runs")
    assert listed.returncode == 0 and before in listed.stdout and after in listed.stdout

    # The API answers an HTML page holding control characters: stage 1 fails and says what came.
    api.payload = "<html>\r\x1b[2J\x1b[31mEvil\u202eLand</html>".encode() + b" " * 300
    failed = run_pipeline("--stages", "1", "--run-id", f"html-{unique}")
    assert failed.returncode == 1
    assert "HTML page, not JSON: <html>\\r\\x1b[2J\\x1b[31mEvil\\u202eLand</html>" in failed.stderr
    assert "HTML page, not JSON: <html>\\r\\x1b[2J" in failed.stdout  # the summary line
    for out in (res, diff, listed, failed):
        assert [line for line in (out.stdout + out.stderr).split("\n") if raw_controls(line)] == [], out.args
