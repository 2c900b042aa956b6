"""How a frame becomes the bytes of an object and back: one encode/decode pair per file format.

`decode` gives the contract's types (lists as Python lists, None for a null text) whichever format
wrote the bytes, so every hop reads the same values. PostgreSQL's own hop (COPY) always speaks CSV.
"""

from __future__ import annotations

import csv
import io
import json
import json.encoder
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from lib.contract import COLUMNS, CONTRACT, LIST_COLUMNS, TEXT_COLUMNS, TYPED_COLUMNS
from lib.errors import PipelineError

if TYPE_CHECKING:  # pandas (~0.4 s to import) is imported where frames are made: the runner checks format names
    import pandas as pd

# The default formats of silver and gold objects (docs/benchmark.md says how they were chosen).
DEFAULT_SILVER = "parquet"
DEFAULT_GOLD = "parquet"


class FormatError(PipelineError):
    """An unknown format, or bytes that do not hold the contract's columns."""


@dataclass(frozen=True)
class Format:
    """A file format: `encode` writes a frame's rows, `read` gives back the rows as stored (no
    types), `decode` the contract's typed frame. A table too large to hold is written in parts,
    joined as they are (less each later part's first `header_lines` lines) unless the format cannot
    be joined (`joinable=False`: it is encoded whole)."""

    name: str
    extension: str
    content_type: str
    encode: Callable[[pd.DataFrame], bytes]
    read: Callable[[bytes], pd.DataFrame]
    header_lines: int = 0
    joinable: bool = True

    def decode(self, data: bytes) -> pd.DataFrame:
        """The rows of an object as the contract types them, whichever format wrote them."""
        return _typed(self.read(data), self.name)


def _typed(frame: pd.DataFrame, what: str) -> pd.DataFrame:
    """Contract types for a frame read from any format (extra columns are kept as read)."""
    import pandas as pd

    missing = [c for c in COLUMNS if c not in frame]
    if missing:
        raise FormatError(f"{what} lacks contract columns: {', '.join(missing)}")
    for col in TEXT_COLUMNS:
        # Built as an object Series: with pandas 3 `.map` re-infers a string dtype and None becomes NaN.
        frame[col] = pd.Series([None if v is None or v == "" or v is pd.NA else v for v in frame[col]],
                               index=frame.index, dtype=object)
    for c in CONTRACT:
        if c.name in TYPED_COLUMNS:
            frame[c.name] = frame[c.name].astype(c.dtype)
    return frame


# --- CSV: list columns as JSON arrays, nulls as empty fields (COPY's CSV null), CRLF rows -----------

def _json_text():
    """json.dumps(value, ensure_ascii=False) without building an encoder per call: the C encoder
    json.dumps itself uses, made once (the pure-Python json.dumps where there is none)."""
    if json.encoder.c_make_encoder is None:
        return lambda value: json.dumps(value, ensure_ascii=False)
    encode = json.encoder.c_make_encoder(None, json.JSONEncoder().default, json.encoder.encode_basestring, None,
                                         ": ", ", ", False, False, True)
    return lambda value: "".join(encode(value, 0))


json_text = _json_text()


def csv_encode(frame: pd.DataFrame) -> bytes:
    out = frame.assign(**{col: [json_text(list(v)) for v in frame[col].tolist()]
                          for col in LIST_COLUMNS if col in frame})
    buf = io.BytesIO()
    # CRLF rows (RFC 4180): the csv writer quotes a field holding any character of the line
    # terminator, so a value with a lone CR is quoted too (with "\n" it would be written bare and
    # split the row on reading).
    out.to_csv(buf, index=False, lineterminator="\r\n", encoding="utf-8")
    return buf.getvalue()


def csv_read(data: bytes) -> pd.DataFrame:
    import pandas as pd

    return _csv_rows(pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False))


def csv_chunks(fileobj, rows: int = 50_000):
    """A CSV object read from a file object as typed frames of at most `rows` rows, so a table of any
    size is never held whole."""
    import pandas as pd

    for frame in pd.read_csv(fileobj, dtype=str, keep_default_na=False, chunksize=rows):
        yield _typed(_csv_rows(frame), "CSV")


def _csv_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """CSV cells as the values they stand for: names lower-cased, list cells parsed from JSON."""
    import pandas as pd

    frame.columns = [c.lower() for c in frame.columns]  # an export may carry upper-case names (column_case)
    for col in LIST_COLUMNS:
        if col in frame:
            # Each cell is a JSON array: the whole column parses as one array of them, in one call.
            frame[col] = pd.Series(json.loads("[" + ",".join(frame[col].tolist()) + "]") if len(frame) else [],
                                   index=frame.index, dtype=object)
    return frame


# --- Arrow: the same values without Python objects per cell -------------------------------------------

def arrow_type(kind):
    """A contract kind's Arrow type (lib/contract.py `Kind.arrow`)."""
    import pyarrow as pa

    return pa.list_(pa.string()) if kind.arrow == "list<string>" else pa.type_for_alias(kind.arrow)


def _arrow_types(extra: dict | None = None) -> dict:
    """The Arrow types a CSV's cells are read as: a number as its type, anything else (lists
    included: they arrive as JSON text) as text."""
    import pyarrow as pa

    return {**{c.name: pa.string() if c.type.pandas == "object" else arrow_type(c.type) for c in CONTRACT},
            **(extra or {})}


READ_BLOCK = 1 << 20  # bytes Arrow's CSV reader takes from the file at a time


class ForwardReader:
    """A binary file object read forward only (an object's body as it downloads): `read`,
    `readline`, bytes put back in front (`unread`), its first line remembered (`first_line`), and
    every byte taken from it also written to `sink` when given (a spool that hashes it)."""
    closed = False

    def __init__(self, raw, sink=None):
        self.raw, self.sink, self.buffer, self.first_line = raw, sink, b"", None

    def readable(self) -> bool:
        return True

    def _raw(self, n: int) -> bytes:
        data = self.raw.read(n) if n >= 0 else self.raw.read()
        if data and self.sink is not None:
            self.sink.write(data)
        return data

    def read(self, n: int | None = -1) -> bytes:
        n = -1 if n is None else n
        if not self.buffer:
            return self._raw(n)
        if n < 0:
            data, self.buffer = self.buffer + self._raw(-1), b""
        else:
            data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def unread(self, data: bytes) -> None:
        self.buffer = data + self.buffer

    def readline(self) -> bytes:
        line = b""
        while chunk := self.read(64 << 10):
            at = chunk.find(b"\n")
            if at >= 0:
                line += chunk[:at + 1]
                self.unread(chunk[at + 1:])
                break
            line += chunk
        if self.first_line is None:
            self.first_line = line
        return line


def _header_names(line: bytes) -> list[str]:
    """A CSV header line's column names, lower-cased (column_case=upper writes them upper-case)."""
    header = line.decode("utf-8")
    return [n.lower() for n in next(csv.reader([header]))] if header.strip() else []


def csv_arrow_batches(fileobj, extra: dict | None = None, block_size: int = 2 << 20):
    """A CSV object (list cells as JSON arrays) read from a file object as Arrow record batches of
    about `block_size` bytes each, typed as the contract (list columns stay JSON text; quality's
    arrow_row_hashes reads them so), an empty text as null as in `decode`; `extra` gives the Arrow
    type of other columns (text by default). Header names are lower-cased (column_case=upper).
    The file is read in blocks of READ_BLOCK bytes and the batches joined up to `block_size`: the
    reader reads a few dozen blocks ahead of the parser, each a Python bytes object the allocator
    keeps afterwards, so big blocks cost some 25 times their size (stage 4 parsing the export of
    100,000 rows grew by ~100 MiB with batches of 8 MiB, by ~60 MiB with 2 MiB)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    stream = fileobj if isinstance(fileobj, ForwardReader) else ForwardReader(fileobj)
    names = _header_names(stream.readline())
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise FormatError(f"CSV lacks contract columns: {', '.join(missing)}")
    first = stream.read(1)
    if not first:
        return  # a header and no rows
    stream.unread(first)
    types = _arrow_types(extra)
    reader = pcsv.open_csv(
        stream,
        read_options=pcsv.ReadOptions(column_names=names, block_size=min(block_size, READ_BLOCK)),
        parse_options=pcsv.ParseOptions(newlines_in_values=True),
        convert_options=pcsv.ConvertOptions(
            column_types={n: types.get(n, pa.string()) for n in names}, strings_can_be_null=True,
            null_values=[""], quoted_strings_can_be_null=True, true_values=["t", "true"], false_values=["f", "false"]))
    pending, size = [], 0
    for batch in reader:
        pending.append(batch)
        size += batch.nbytes
        if size >= block_size:
            yield _joined(pending)
            pending, size = [], 0
    if pending:
        yield _joined(pending)


def _joined(batches):
    """Record batches of one schema as one batch."""
    import pyarrow as pa

    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


def parquet_arrow_batches(data: bytes, rows: int = 65_536):
    """A Parquet object's rows as Arrow record batches of at most `rows` rows, with the contract's
    columns typed as `decode` types them (an empty text as null) and any other columns as stored."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(io.BytesIO(data))
    missing = [c for c in COLUMNS if c not in parquet.schema_arrow.names]
    if missing:
        raise FormatError(f"Parquet lacks contract columns: {', '.join(missing)}")
    types = _arrow_types()
    for batch in parquet.iter_batches(batch_size=rows):
        yield pa.record_batch([typed_column(name, batch.column(name), types) for name in batch.schema.names],
                              names=batch.schema.names)


def typed_column(name: str, values, types: dict | None = None):
    """A column read from Parquet typed as `decode` types it: a contract text column as text with an
    empty text as null, a contract number as its type; lists and other columns as stored. `types`:
    `_arrow_types()`, when the caller has them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    types = _arrow_types() if types is None else types
    if name in TEXT_COLUMNS:
        values = pc.cast(values, pa.string())
        empty = pc.equal(values, "")  # copied only when it holds an empty text
        return pc.if_else(empty, pa.scalar(None, pa.string()), values) if pc.any(empty).as_py() else values
    if name in types and name not in LIST_COLUMNS:
        return pc.cast(values, types[name])
    return values


def arrow_lists(batch):
    """A record batch whose list columns hold JSON array text (a CSV's cells), with those columns as
    list<string>: all of them parsed in one call of Arrow's JSON reader (one object per row), never
    as Python objects."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pjson

    present = [c for c in LIST_COLUMNS if c in batch.schema.names]
    if not len(batch) or not present:
        return batch
    text = pa.large_string()
    parts = []
    for i, name in enumerate(present):
        parts += [pa.scalar(("{" if i == 0 else ",") + json.dumps(name) + ":", text), pc.cast(batch.column(name), text)]
    lines = pc.binary_join_element_wise(*parts, pa.scalar("}\n", text), pa.scalar("", text))
    if lines.null_count:
        raise FormatError("a list cell is empty")
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int64)[lines.offset:lines.offset + len(lines) + 1]
    body = lines.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    schema = pa.schema([(name, pa.list_(pa.string())) for name in present])
    parsed = pjson.read_json(pa.BufferReader(body), parse_options=pjson.ParseOptions(explicit_schema=schema),
                             read_options=pjson.ReadOptions(use_threads=True, block_size=max(1 << 20, body.size + 1)))
    if len(parsed) != len(batch):
        raise FormatError(f"{len(batch)} rows but {len(parsed)} parsed list cells")
    columns = [parsed.column(n).combine_chunks() if n in present else batch.column(n) for n in batch.schema.names]
    return pa.record_batch(columns, names=batch.schema.names)


def csv_to_parquet(data) -> tuple[bytes, int]:
    """A CSV object (an export, a CSV gold table; bytes or a binary file object, read forward only:
    a download as it arrives) as Parquet bytes with the contract's types (lists as list<string>, an
    empty text as null, lower-case names), converted batch by batch; and its rows."""
    import pyarrow.parquet as pq

    source = ForwardReader(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    out, writer, rows = io.BytesIO(), None, 0
    for batch in csv_arrow_batches(source):
        batch = arrow_lists(batch)
        if writer is None:
            writer = pq.ParquetWriter(out, batch.schema, compression="zstd")
        writer.write_batch(batch)
        rows += len(batch)
    if writer is None:
        import pyarrow as pa

        names = _header_names(source.first_line or b"") or list(COLUMNS)
        types = _arrow_types({c: pa.list_(pa.string()) for c in LIST_COLUMNS})
        writer = pq.ParquetWriter(out, pa.schema([(n, types.get(n, pa.string())) for n in names]), compression="zstd")
    writer.close()
    return out.getvalue(), rows


def escape_present(values, escapes: dict[str, str], control=None):
    """Arrow text with each character of `escapes` that occurs replaced by its escape, in the dict's
    order (put the backslash first), then, when `control` is given, each control character that
    occurs (U+0000-U+001F) replaced by control(char). One scan of the text's bytes finds which
    occur (in UTF-8 a byte below 0x80 is always that character); only those cost a pass."""
    import numpy as np
    import pyarrow.compute as pc

    data = values.buffers()[2]
    if data is None:
        return values
    raw = np.frombuffer(data, dtype=np.uint8)
    wanted = raw < 0x20 if control is not None else np.zeros(len(raw), dtype=bool)
    for char in escapes:
        wanted |= raw == ord(char)
    found = set(np.unique(raw[wanted]).tolist())
    for char, escape in escapes.items():
        if ord(char) in found:
            values = pc.replace_substring(values, char, escape)
    for code in sorted(c for c in found if c < 0x20 and chr(c) not in escapes):
        values = pc.replace_substring(values, chr(code), control(chr(code)))
    return values


def pg_arrays(values):
    """Each list of strings (an Arrow list array) as the text of a PostgreSQL array literal, built with
    Arrow kernels: every element double-quoted with backslash and double quote escaped (so "NULL", an
    empty string, commas, braces and spaces are kept as they are), a null element as NULL, an empty
    list as {}; a null list stays null (COPY's null). PostgreSQL's array input reads it back exactly."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_large_list(values.type):
        values = values.cast(pa.list_(values.type.value_type))
    text = pa.large_string()
    items = pc.cast(values.values, text)
    items = escape_present(items, {"\\": "\\\\", '"': '\\"'})
    items = pc.fill_null(pc.binary_join_element_wise(pa.scalar('"', text), items, pa.scalar('"', text),
                                                     pa.scalar("", text)), pa.scalar("NULL", text))
    lists = pa.ListArray.from_arrays(values.offsets, items)  # a null list: masked below
    literals = pc.binary_join_element_wise(pa.scalar("{", text), pc.binary_join(lists, pa.scalar(",", text)),
                                           pa.scalar("}", text), pa.scalar("", text))
    return pc.if_else(values.is_null(), pa.scalar(None, text), literals) if values.null_count else literals


# Rows converted at a time for COPY: 65,536 grew stage 3 (100,000 records) by ~130 MiB, 16,384 by 30-55.
COPY_ROWS = 16_384


def copy_csv(data: bytes, format_name: str, sink) -> int:
    """A silver object's bytes as the CSV that the load's COPY reads (db_load.merge with lists="array"):
    the contract columns then _row_hash, each list cell a PostgreSQL array literal (`pg_arrays`), a
    null an empty field, written to `sink`; returns its rows. Either format is converted batch by
    batch in Arrow, never as Python objects (a CSV object's JSON list cells parsed by `arrow_lists`)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    writer, rows = None, 0
    wanted = [*COLUMNS, "_row_hash"]
    fmt = get(format_name)
    batches = (arrow_lists(b) for b in csv_arrow_batches(io.BytesIO(data))) if fmt is CSV \
        else parquet_arrow_batches(to_parquet(fmt, data), rows=COPY_ROWS)
    for batch in batches:
        names = [n for n in wanted if n in batch.schema.names]
        out = pa.record_batch([pg_arrays(batch.column(n)) if n in LIST_COLUMNS else batch.column(n)
                               for n in names], names=names)
        if writer is None:
            writer = pcsv.CSVWriter(sink, out.schema)
        writer.write_batch(out)
        rows += len(out)
    if writer is None:  # no rows: the header alone
        sink.write((",".join(f'"{n}"' for n in wanted) + "\n").encode())
    else:
        writer.close()
    return rows


class UpperHeader:
    """A write-through sink that upper-cases the first line (the CSV header) of what passes through
    it: the seed's upper-case column names for an export streamed by COPY, the rows untouched."""

    def __init__(self, sink):
        self.sink = sink
        self.pending = b""  # the header until its newline has arrived; None after

    def write(self, chunk) -> int:
        if isinstance(chunk, str):
            chunk = chunk.encode("utf-8")
        if self.pending is None:
            return self.sink.write(chunk)
        self.pending += chunk
        head, newline, rest = self.pending.partition(b"\n")
        if newline:
            self.sink.write(head.upper() + newline + rest)
            self.pending = None
        return len(chunk)


# --- Parquet (pyarrow): list columns as list<string>, typed numbers ----------------------------------

def parquet_encode(frame: pd.DataFrame) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    table = pa.Table.from_pandas(frame, preserve_index=False)
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def parquet_read(data: bytes, rows: int | None = None) -> pd.DataFrame:
    """The rows of a Parquet object (only its first `rows` rows when given), as stored."""
    import pyarrow.parquet as pq

    if rows is None:
        table = pq.read_table(io.BytesIO(data))
    else:
        import pyarrow as pa

        batch = next(pq.ParquetFile(io.BytesIO(data)).iter_batches(batch_size=rows), None)
        table = pa.Table.from_batches([batch]) if batch is not None else pq.read_table(io.BytesIO(data))
    import pandas as pd

    return pd.DataFrame({
        name: pd.Series(table.column(name).to_pylist(), dtype=object) for name in table.column_names})


def parquet_decode(data: bytes, rows: int | None = None) -> pd.DataFrame:
    """The rows of a Parquet object (only its first `rows` rows when given) as a typed frame."""
    return _typed(parquet_read(data, rows), "Parquet")


FORMATS = {
    "csv": Format("csv", "csv", "text/csv", csv_encode, csv_read, header_lines=1),
    "parquet": Format("parquet", "parquet", "application/vnd.apache.parquet", parquet_encode, parquet_read,
                      joinable=False),
}
CSV, PARQUET = FORMATS["csv"], FORMATS["parquet"]  # the export's format (COPY speaks CSV); the working one


def to_parquet(fmt: Format, data: bytes) -> bytes:
    """An object's bytes as typed Parquet (the change report and the load read Parquet)."""
    if fmt is PARQUET:
        return data
    if fmt is CSV:
        return csv_to_parquet(data)[0]
    return parquet_encode(fmt.decode(data))


def from_parquet(fmt: Format, data: bytes) -> bytes:
    """Typed Parquet bytes as an object in `fmt`."""
    return data if fmt is PARQUET else fmt.encode(parquet_decode(data))


def join(fmt: Format, parts) -> object:
    """The encoded parts of one table as one object's bytes, given as an iterator of chunks: each
    later part less its first `header_lines` lines (a CSV's header is written once)."""
    for number, part in enumerate(parts):
        if number and fmt.header_lines:
            for _ in range(fmt.header_lines):
                part = part[part.index(b"\n") + 1:]
        yield part


def get(name: str) -> Format:
    """A format by name."""
    try:
        return FORMATS[name]
    except KeyError:
        raise FormatError(f"file format {name!r} is not one of {', '.join(FORMATS)}") from None


def of_key(key: str) -> Format:
    """The format of an object, from its key's extension."""
    extension = key.rsplit(".", 1)[-1]
    for fmt in FORMATS.values():
        if fmt.extension == extension:
            return fmt
    raise FormatError(f"object {key!r} has no known format extension ({', '.join(FORMATS)})")


def other_format_keys(key: str) -> list[str]:
    """The same key in every other format (none when the key is not in a known format)."""
    stem, _, extension = key.rpartition(".")
    if not any(f.extension == extension for f in FORMATS.values()):
        return []
    return [f"{stem}.{f.extension}" for f in FORMATS.values() if f.extension != extension]


# --- list and text cells as JSON text, column-wise in pyarrow's compute kernels ---------------------
# Strings escaped exactly as json.dumps(ensure_ascii=False) escapes them: \\ and \" always, \b \f \n \r \t by
# name, any other control character as \u00xx (the row hashes, lib/quality.py, and the change report,
# lib/changes.py, compare list cells by this text).

_NAMED_ESCAPES = {"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# One JSON string exactly as json.dumps(ensure_ascii=False) writes it, and a JSON array of them as
# json.dumps writes it (", " between items) or PostgreSQL's array_to_json does ("," between items).
_JSON_STRING = r'"(?:[^"\\\x00-\x1f]|\\["\\bfnrt]|\\u00(?:0[0-7]|0b|0e|0f|1[0-9a-f]))*"'
_JSON_TEXT_LIST = rf"^\[(?:{_JSON_STRING}(?:, ?{_JSON_STRING})*)?\]$"


def pyarrow_compute():
    """pyarrow and its compute functions, imported where Arrow columns are made."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pa, pc


def large_text(value: str):
    """A large_string scalar, to join Arrow text columns with."""
    pa, _ = pyarrow_compute()
    return pa.scalar(value, pa.large_string())


def json_strings(values):
    """Each string as its JSON literal (null stays null)."""
    pa, pc = pyarrow_compute()
    values = escape_present(pc.cast(values, pa.large_string()), {"\\": "\\\\", '"': '\\"'},
                            lambda char: _NAMED_ESCAPES.get(char, f"\\u{ord(char):04x}"))
    return pc.binary_join_element_wise(large_text('"'), values, large_text('"'), large_text(""))


def json_lists(values):
    """Each list of strings as its JSON text. A string column holds JSON arrays already (a CSV's list
    cells): when every cell is a JSON array of strings escaped as json.dumps escapes them, only the
    separator may differ ("," from PostgreSQL), and it is rewritten as ", " after each whole string
    the pattern matches (matching from a cell's opening quote string by string, a quote escaped
    inside a string is never taken for a string's end); any other spelling is parsed and written again."""
    pa, pc = pyarrow_compute()
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        if values.null_count == 0 and pc.all(pc.match_substring_regex(values, _JSON_TEXT_LIST)).as_py() is not False:
            return pc.replace_substring_regex(pc.cast(values, pa.large_string()), f"({_JSON_STRING}), ?", r"\1, ")
        values = pa.array(json.loads("[" + ",".join(values.to_pylist()) + "]"), pa.list_(pa.large_string()))
    if values.null_count:
        raise ValueError("a list column holds a null")
    if pa.types.is_large_list(values.type):
        values = values.cast(pa.list_(values.type.value_type))
    lists = pa.ListArray.from_arrays(values.offsets, json_strings(values.values))
    return pc.binary_join_element_wise(large_text("["), pc.binary_join(lists, large_text(", ")), large_text("]"), large_text(""))
