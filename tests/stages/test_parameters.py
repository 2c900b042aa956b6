"""lib.stages.parameters: every stage's parameters declared once, the notebooks' `parameters` cells
written from them, and the rules a value passes beyond its type, the same for the runner's `-p` and
for a notebook's `begin`."""

from __future__ import annotations

import json

import pytest

from lib import registry
from lib.config import ROOT
from lib.params import UsageError
from lib.stages import parameters


@pytest.mark.parametrize("stage", registry.NAMES)
def test_each_notebooks_parameters_cell_is_its_declaration(stage):
    nb = json.loads(registry.get(stage).notebook.read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(cells) == 1
    assert "".join(cells[0]["source"]) == parameters.cell(stage), (
        f"write the cell again: python -c 'from lib.stages import parameters; print(parameters.cell(\"{stage}\"))'")


def test_the_parameters_table_in_the_docs_is_the_declared_one():
    assert parameters.table() in (ROOT / "docs" / "runner.md").read_text(encoding="utf-8"), \
        "regenerate: python -m lib.stages.parameters"


def test_every_stage_declares_a_run_id_and_defaults_that_pass_their_own_rules():
    for stage in registry.NAMES:
        declared = parameters.declared(stage)
        assert list(declared)[0] == "run_id"
        for name, p in declared.items():
            assert isinstance(p.default, p.type) and parameters.check(stage, name, p.default) == p.default


def test_values_are_typed_checked_and_frozen():
    values = parameters.values("03_load", {"run_id": "r", "retire_missing": "no", "table": "t"})
    assert values.retire_missing is False and values.table == "t" and values.write_mode == "upsert"
    with pytest.raises(AttributeError):
        values.table = "other"
    assert parameters.values("01_ingest", {"connect_timeout": 2}).connect_timeout == 2.0
    with pytest.raises(UsageError, match="min_records='many': expected a value of type int"):
        parameters.values("02_clean", {"min_records": "many"})
    with pytest.raises(UsageError, match="03_load has no parameter 'colour'"):
        parameters.values("03_load", {"colour": "blue"})
    with pytest.raises(UsageError, match="max_attempts=True is not a int"):
        parameters.values("01_ingest", {"max_attempts": True})


def test_stage_functions_use_the_same_checks():
    with pytest.raises(UsageError, match="write_mode 'merge' is not one of"):
        parameters.check("03_load", "write_mode", "merge")
    assert parameters.check("02_clean", "silver_format", "parquet") == "parquet"
    with pytest.raises(UsageError, match="file format 'xml' is not one of csv, parquet"):
        parameters.check("05_gold", "gold_format", "xml")


def test_a_rule_of_another_module_is_reported_as_a_usage_error():
    with pytest.raises(UsageError, match="1 to 10 fields"):
        parameters.check("01_ingest", "api_url", "https://restcountries.com/v3.1/all")
    with pytest.raises(UsageError, match="schema 'pg_x' is a system schema"):
        parameters.check("03_load", "db_schema", "pg_x")
    with pytest.raises(UsageError, match="04_export has no parameter 'write_mode'"):
        parameters.check("04_export", "write_mode", "upsert")


@pytest.mark.parametrize("url", ["https://reader:s3cret@restcountries.com/v3.1/all?fields=name",
                                 "https://restcountries.com/v3.1/all?fields=name&apikey=s3cret"])
def test_an_api_url_parameter_with_credentials_is_refused_without_showing_them(url):
    """A parameter is written into the executed notebook (papermill's injected cell): credentials go in
    API_BASE_URL, which no notebook holds."""
    with pytest.raises(UsageError, match="api_url carries credentials.*API_BASE_URL") as err:
        parameters.check("01_ingest", "api_url", url)
    assert "s3cret" not in str(err.value)
    masked = "https://***@restcountries.com/v3.1/all?fields=name"  # already masked: nothing to hide
    assert parameters.check("01_ingest", "api_url", masked) == masked


def test_the_airflow_dags_parameter_schema_is_the_declared_one():
    written = json.loads(parameters.SCHEMA_FILE.read_text(encoding="utf-8"))
    assert written == parameters.schema(), "write it again: python -m lib.stages.parameters --schema"
    assert written["properties"]["table"]["type"] == "string" and "run_id" not in written["properties"]
    assert written["properties"]["retire_missing"]["type"] == "boolean"


def test_run_pipeline_params_prints_every_stages_declarations(run_pipeline):
    res = run_pipeline("params")
    assert res.returncode == 0, res.stderr
    for stage in registry.NAMES:
        assert f"{stage}  {registry.get(stage).title}" in res.stdout
        for name, p in parameters.declared(stage).items():
            assert any(line.split()[:2] == [name, p.type_name] for line in res.stdout.splitlines()), (stage, name)
