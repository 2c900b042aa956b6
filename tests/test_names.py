"""lib.names: every user-supplied name is returned unchanged or refused with InvalidName."""

from __future__ import annotations

import pytest

from lib import names
from lib.names import InvalidName


@pytest.mark.parametrize("value", ["20250101T000000Z-abc123", "run-1", "a", "A.b_c-d", "x" * 64])
def test_run_id_accepts_safe_ids_unchanged(value):
    assert names.run_id(value) == value


@pytest.mark.parametrize("value", ["", "-lead", ".hidden", "a/b", "a..b", "../etc", "a b", "x" * 65,
                                   "run;rm", None, 5])
def test_run_id_refuses_unsafe_ids(value):
    with pytest.raises(InvalidName, match="run id"):
        names.run_id(value)


@pytest.mark.parametrize("value", ["raw", "clean", "my-bucket.1", "a" * 63])
def test_bucket_accepts_s3_names(value):
    assert names.bucket(value) == value


@pytest.mark.parametrize("value", ["ab", "a" * 64, "Upper", "under_score", "-lead", "trail-", "a..b",
                                   "192.168.1.1", "", None])
def test_bucket_refuses_names_s3_would_refuse(value):
    with pytest.raises(InvalidName, match="bucket name"):
        names.bucket(value)


@pytest.mark.parametrize("value", ["", "exports", "exports/countries", "a=1/b.c_d-e"])
def test_prefix_accepts_clean_prefixes(value):
    assert names.prefix(value) == value


@pytest.mark.parametrize("value", ["/lead", "trail/", "a//b", "a/../b", ".", "..", "a b", "a/*", None])
def test_prefix_refuses_empty_dot_or_odd_parts(value):
    with pytest.raises(InvalidName, match="key prefix"):
        names.prefix(value)


@pytest.mark.parametrize("value", ["capitals_clean", "_t", "t1", "a" * 63])
def test_sql_identifier_accepts_lower_case_names(value):
    assert names.sql_identifier(value) == value


@pytest.mark.parametrize("value", ["a;drop", 'Robert"); --', "Capitals", "1table", "", "a-b", "a b",
                                   "a" * 64, "tâble", None])
def test_sql_identifier_refuses_unsafe_names_and_says_what(value):
    with pytest.raises(InvalidName, match="^table "):
        names.sql_identifier(value, "table")


def test_invalid_name_is_a_value_error():
    assert issubclass(InvalidName, ValueError)


@pytest.mark.parametrize("value", ["information_schema", "pg_catalog", "pg_toast", "pg_temp_3", "pg_anything"])
def test_schema_refuses_system_schemas(value):
    with pytest.raises(InvalidName, match="system schema"):
        names.schema(value)


@pytest.mark.parametrize("value", ["public", "gold", "pgx", "my_pg_schema"])
def test_schema_accepts_ordinary_schemas(value):
    assert names.schema(value) == value
