"""lib.stages.parameters: the rules a stage parameter passes beyond its type, the same for the runner's
`-p` and for a notebook's `begin`."""

from __future__ import annotations

import pytest

from lib.params import UsageError
from lib.stages import parameters


def test_stage_functions_use_the_same_checks():
    with pytest.raises(UsageError, match="write_mode 'merge' is not one of"):
        parameters.check("write_mode", "merge")
    assert parameters.check("silver_format", "parquet") == "parquet"
    with pytest.raises(UsageError, match="file format 'xml' is not one of csv, parquet"):
        parameters.check("gold_format", "xml")


def test_a_rule_of_another_module_is_reported_as_a_usage_error():
    with pytest.raises(UsageError, match="1 to 10 fields"):
        parameters.check("api_url", "https://restcountries.com/v3.1/all")
    with pytest.raises(UsageError, match="schema 'pg_x' is a system schema"):
        parameters.check("db_schema", "pg_x")
    assert parameters.check("no_such_parameter", object) is object  # no rule: the type alone decides
