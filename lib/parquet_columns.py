"""One column of a Parquet object, read alone (Parquet stores columns apart) and typed as
`formats.decode` types it: whole, at chosen rows, or forward at rising rows, a batch at a time. What
the change report (lib/changes.py) reads of two gold tables: a long text column of a million rows is
never held whole when only some of its rows, or a slice of them at a time, are wanted."""

from __future__ import annotations

import io

from lib import formats


def source(data):
    """A Parquet object given as bytes, or as a binary file that can seek (a spool on disk), as
    pyarrow opens it."""
    return io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data


BATCH_ROWS = 16_384  # rows of a column decoded at a time (a long text column: ~5 MiB)


def whole(data, name: str, combine: bool = True):
    """One column of a Parquet object (bytes or a file: `source`) as an Arrow array; with combine=False
    as the chunked array Parquet gives (its pieces are not copied into one)."""
    import pyarrow.parquet as pq

    column = pq.read_table(source(data), columns=[name]).column(name)
    return formats.typed_column(name, column.combine_chunks() if combine else column)


class Forward:
    """One column read forward a batch at a time: `take` gives the values at row positions that rise,
    each call's after the last call's; only the batch that holds them is decoded, and only the wanted
    rows are kept and typed."""

    def __init__(self, data, name: str, batch_size: int | None = None):
        import pyarrow.parquet as pq

        self.name = name
        parquet = pq.ParquetFile(source(data))
        self.type = parquet.schema_arrow.field(name).type
        self.batches = parquet.iter_batches(batch_size=batch_size or BATCH_ROWS, columns=[name])
        self.values, self.start = None, 0  # the batch at hand and its first row's position
        self.last = -1

    def take(self, rows):
        """The values at `rows` (rising NumPy ints, none before the last call's), in that order."""
        import numpy as np
        import pyarrow as pa

        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows[0] < self.last or (len(rows) > 1 and (rows[1:] < rows[:-1]).any())):
            raise ValueError("Forward.take is given rising row positions, none before an earlier call's")
        pieces = []
        while len(rows):
            if self.values is None or rows[0] >= self.start + len(self.values):
                if self.values is not None:
                    self.start += len(self.values)
                try:
                    self.values = next(self.batches).column(0)
                except StopIteration:
                    raise IndexError(f"row {rows[0]} is past the end of column {self.name}") from None
                continue
            end = int(np.searchsorted(rows, self.start + len(self.values)))
            pieces.append(self.values.take(pa.array(rows[:end] - self.start)))
            self.last, rows = int(rows[end - 1]), rows[end:]
        values = pa.concat_arrays(pieces) if pieces else pa.array([], self.type)
        return formats.typed_column(self.name, values)


def at(data, name: str, rows, batch_size: int | None = None):
    """The values of one column at the row positions `rows` (NumPy ints, in any order), in that order:
    read forward a batch at a time, only the wanted rows kept (a long text column is never held
    whole, nor copied whole to type it)."""
    import numpy as np
    import pyarrow as pa

    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    values = Forward(data, name, batch_size).take(rows[order])
    # asked in the file's order, they are as they are
    return values if (order[1:] > order[:-1]).all() else values.take(pa.array(np.argsort(order, kind="stable")))


def pairs(old, new, name: str, old_rows, new_rows, chunk: int | None = None):
    """One column of two Parquet objects at matched rows (old_rows[i] is new_rows[i]), `chunk` pairs
    at a time: (the pairs' indexes i, old values, new values). The old object is read forward in the
    order of its rows; so is the new one when the pairs rise in both (two tables written in the same
    key order: only a batch of each is held), otherwise its matched rows are held (`at`)."""
    import numpy as np

    old_rows, new_rows = np.asarray(old_rows, dtype=np.int64), np.asarray(new_rows, dtype=np.int64)
    order = np.argsort(old_rows, kind="stable")
    in_step = bool((np.diff(new_rows[order]) > 0).all())
    olds = Forward(old, name)
    news = Forward(new, name) if in_step else at(new, name, new_rows[order])
    chunk = chunk or BATCH_ROWS
    for start in range(0, len(order), chunk):
        index = order[start:start + chunk]
        new_values = news.take(new_rows[index]) if in_step else news.slice(start, len(index))
        yield index, olds.take(old_rows[index]), new_values
