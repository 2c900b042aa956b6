"""lib.parquet_columns: one column of a Parquet object, whole, at chosen rows, or forward in step with
another table's rows (what the change report reads of two gold tables)."""

from __future__ import annotations

import numpy as np
import pytest

from lib import formats, parquet_columns, quality, source, transform

NAMES = ("name_common", "capital", "population", "area", "flag_alt")


@pytest.fixture(scope="module")
def data():
    records = source.parse_payload(source.snapshot_bytes())
    return formats.get("parquet").encode(quality.validate(transform.flatten(records), records).clean)


def test_at_reads_the_wanted_rows_of_a_column_in_the_order_asked(data):
    asked = [np.array([200, 3, 3, 249, 0, 120, 64]),  # out of order, one twice, across batches of 64
             np.array([0, 3, 3, 64, 120, 249]), np.array([7])]  # in the file's order: taken as they are
    for name in NAMES:
        whole = parquet_columns.whole(data, name)
        for rows in asked:
            assert parquet_columns.at(data, name, rows, batch_size=64).to_pylist() == whole.take(rows).to_pylist()
        empty = parquet_columns.at(data, name, np.array([], dtype=np.int64))
        assert len(empty) == 0 and empty.type == whole.type


def test_forward_gives_rising_rows_call_after_call_and_refuses_to_go_back(data):
    whole = parquet_columns.whole(data, "flag_alt")
    forward = parquet_columns.Forward(data, "flag_alt", batch_size=16)
    assert forward.take([1, 1, 5]).to_pylist() == whole.take([1, 1, 5]).to_pylist()
    assert forward.take([5, 100, 101, 240]).to_pylist() == whole.take([5, 100, 101, 240]).to_pylist()  # batches skipped
    assert len(forward.take([])) == 0
    with pytest.raises(ValueError, match="rising"):
        forward.take([7])
    with pytest.raises(ValueError, match="rising"):
        parquet_columns.Forward(data, "flag_alt").take([9, 8])
    with pytest.raises(IndexError, match="past the end"):
        forward.take([250])


@pytest.mark.parametrize("in_step", [True, False])
def test_pairs_gives_both_columns_at_matched_rows_a_chunk_at_a_time(data, in_step, monkeypatch):
    """Matched rows that rise in both tables are read forward in both (never a column's matched rows
    held: `at` is not called); otherwise the new side's are held and the old side read forward.
    Either way each pair's values come with its index, every pair once."""
    rng = np.random.default_rng(5)
    old_rows = np.sort(rng.choice(250, size=120, replace=False))
    new_rows = np.sort(rng.choice(250, size=120, replace=False))
    if not in_step:
        rng.shuffle(new_rows)
    if in_step:
        monkeypatch.setattr(parquet_columns, "at", lambda *a, **k: pytest.fail("the matched rows were held"))
    for name in NAMES:
        whole = parquet_columns.whole(data, name).to_pylist()
        seen = []
        for index, old, new in parquet_columns.pairs(data, data, name, old_rows, new_rows, chunk=32):
            assert len(index) <= 32
            assert old.to_pylist() == [whole[i] for i in old_rows[index]]
            assert new.to_pylist() == [whole[i] for i in new_rows[index]]
            seen += index.tolist()
        assert sorted(seen) == list(range(120))
