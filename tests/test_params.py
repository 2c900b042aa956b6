"""lib.params: --stages and -p parsing (with the notebooks' declarations and the stages' rules, as
`runner.parse_parameters` hands them in), one boolean vocabulary."""

from __future__ import annotations

import pytest

from lib import params, registry, runner
from lib.params import UsageError

ALL = list(registry.NAMES)


# --- parse_stages ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("1-5", ALL),
    ("2-4", ALL[1:4]),
    ("3", ["03_load"]),
    ("1,3,5", ["01_ingest", "03_load", "05_gold"]),
    ("5, 1", ["01_ingest", "05_gold"]),
    ("2-3,3,1-2", ALL[:3]),
])
def test_parse_stages_gives_stage_names_in_pipeline_order(spec, expected):
    assert params.parse_stages(spec) == expected


@pytest.mark.parametrize("spec, problem", [
    ("0", "no stage 0"),
    ("6", "no stage 6"),
    ("1-9", "no stage 6"),
    ("4-2", "runs backwards"),
    ("a", "not a stage number"),
    ("", "not a stage number"),
    ("1-", "not a stage number"),
    ("1,,2", "not a stage number"),
])
def test_parse_stages_refuses_bad_specs(spec, problem):
    with pytest.raises(UsageError, match=problem):
        params.parse_stages(spec)


# --- parse_params ------------------------------------------------------------------------------------

def test_parse_params_types_values_as_the_notebooks_declare():
    out = runner.parse_parameters(["min_records=200", "max_total_seconds=2.5", "retire_missing=no",
                                 "write_mode=append", "table=my_table"], ALL)
    assert out["01_ingest"] == {"min_records": 200, "max_total_seconds": 2.5}
    assert out["02_clean"] == {"min_records": 200}
    assert out["03_load"] == {"retire_missing": False, "write_mode": "append", "table": "my_table"}
    assert out["04_export"] == {"table": "my_table"} and out["05_gold"] == {"table": "my_table"}
    assert isinstance(out["01_ingest"]["max_total_seconds"], float)


def test_parse_params_gives_each_chosen_stage_an_entry():
    assert runner.parse_parameters([], ["02_clean", "03_load"]) == {"02_clean": {}, "03_load": {}}


@pytest.mark.parametrize("pair, problem", [
    ("min_records=many", "expected a value of type int"),
    ("max_total_seconds=fast", "expected a value of type float"),
    ("retire_missing=maybe", "expected a value of type bool"),
    ("noequals", "use KEY=VALUE"),
    ("=5", "use KEY=VALUE"),
    ("run_id=x", "use --run-id"),
    ("colour=blue", "no chosen stage has a parameter 'colour'; known: "),
    ("table=a;drop", "table 'a;drop' is not allowed"),
    ('table=Robert"); --', "is not allowed"),
    ("db_schema=Public", "schema 'Public' is not allowed"),
    ("write_mode=merge", "write_mode 'merge' is not one of upsert, append, replace"),
    ("backfill_date=2025-1-1", "not YYYY-MM-DD"),
    ("snapshot_fallback=sometimes", "not auto, true or false"),
    ("api_url=https://restcountries.com/v3.1/all", "1 to 10 fields"),
    ("max_invalid_fraction=1.5", "not between 0 and 1"),
    ("max_invalid_fraction=nan", "not between 0 and 1"),
    ("min_records=0", "min_records 0 must be at least 1"),
    ("max_attempts=0", "max_attempts 0 must be at least 1"),
    ("preview_rows=-1", "preview_rows -1 must not be negative"),
    ("read_timeout=0", "read_timeout 0.0 must be more than 0"),
    ("max_total_seconds=-5", "max_total_seconds -5.0 must be more than 0"),
])
def test_parse_params_refuses_bad_values_before_anything_runs(pair, problem):
    with pytest.raises(UsageError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        runner.parse_parameters([pair], ALL)


def test_a_parameter_of_a_stage_not_chosen_is_refused():
    with pytest.raises(UsageError, match="no chosen stage has a parameter 'write_mode'"):
        runner.parse_parameters(["write_mode=append"], ["01_ingest", "02_clean"])


def test_unknown_parameter_error_lists_the_known_ones_without_run_id():
    with pytest.raises(UsageError) as err:
        runner.parse_parameters(["nope=1"], ["05_gold"])
    assert "known: gold_format, input_run, preview_rows, table" in str(err.value)


def test_parse_takes_the_declarations_and_rules_it_is_given():
    def rule(stage, key, value):
        if value == 13:
            raise UsageError(f"13 is unlucky for {stage}")
        return value

    known = {"a": {"n": "int"}, "b": {"n": "int", "s": "str"}}
    assert params.parse(["n=7", "s=x"], known, rule) == {"a": {"n": 7}, "b": {"n": 7, "s": "x"}}
    with pytest.raises(UsageError, match="-p n: 13 is unlucky for a"):
        params.parse(["n=13"], known, rule)


def test_an_empty_value_is_allowed_where_empty_means_default():
    out = runner.parse_parameters(["api_url=", "backfill_date="], ["01_ingest", "02_clean"])
    assert out == {"01_ingest": {"api_url": ""}, "02_clean": {"backfill_date": ""}}


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True), (True, True),
    ("false", False), ("0", False), ("No", False), ("off", False), (False, False),
])
def test_one_boolean_vocabulary(text, expected):
    assert params.boolean(text, "flag") is expected


def test_a_word_outside_the_boolean_vocabulary_is_refused_naming_the_parameter():
    with pytest.raises(UsageError, match="retire_missing='maybe' is not a boolean"):
        params.boolean("maybe", "retire_missing")
