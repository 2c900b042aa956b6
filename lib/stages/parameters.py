"""Every stage's parameters, each declared once: its type, default, rule and help.

A stage notebook's `parameters` cell is this declaration written out (`cell(stage)`; a test keeps
them equal), `context.begin` turns what the notebook holds into the stage's typed parameters
(`StageRun.params`), the runner types and checks `-p KEY=VALUE` with it before any kernel starts,
and `run_pipeline.py params`, the Airflow DAG and docs/runner.md read it. This module imports
nothing heavy, so the runner can.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from lib import db, formats, layout, names, params, redact, registry, source
from lib.errors import PipelineError

DEFAULT_TABLE = layout.CLEAN_NAME  # the seed's table name, as the silver object is named


@dataclass(frozen=True)
class Parameter:
    type: type  # str, int, float or bool
    default: Any
    help: str
    rule: Callable[[Any], Any] | None = None  # returns the value or raises a PipelineError

    @property
    def type_name(self) -> str:
        return self.type.__name__


def _one_of(name: str, choices) -> Callable:
    return lambda v: v if v in choices else params.bad(f"{name} {v!r} is not one of {', '.join(choices)}")


def _at_least(name: str, low, what: str = "must be at least") -> Callable:
    return lambda v: v if v >= low else params.bad(f"{name} {v} {what} {low}")


def _positive(name: str) -> Callable:
    return lambda v: v if v > 0 else params.bad(f"{name} {v} must be more than 0")


def _format(v: str) -> str:
    return v if v == "" else formats.get(v).name


def _api_url(v: str) -> str:
    """An API URL without credentials: a parameter is written into the executed notebook."""
    if redact.url(v) != v:
        params.bad("api_url carries credentials, and a parameter is written into every executed notebook: "
                   "set the URL with them in API_BASE_URL (.env or the environment) instead")
    return v if v == "" else source.check_url(v)


RUN_ID = Parameter(str, "", "empty: this kernel's own run (a new lab-… or papermill-… run)",
                   lambda v: v if v == "" else names.run_id(v))
INPUT_RUN = Parameter(str, "", "the run whose data this stage reads when its own run did not execute the stage "
                      "before; empty: the latest published run", lambda v: v if v == "" else names.run_id(v))
TABLE = Parameter(str, DEFAULT_TABLE, "", lambda v: names.sql_identifier(v, "table"))
DB_SCHEMA = Parameter(str, "public", "", names.schema)
MIN_RECORDS = Parameter(int, 200, "", _at_least("min_records", 1))
PREVIEW_ROWS = Parameter(int, 10, "rows shown in previews", lambda v: v if v >= 0 else
                         params.bad(f"preview_rows {v} must not be negative"))

# By stage (lib/registry.py `Stage.step`), in the order the notebook's cell lists them.
DECLARED: dict[str, dict[str, Parameter]] = {
    "ingest": {
        "run_id": replace(RUN_ID, help="empty: a new run id"),
        "api_url": Parameter(str, "", "empty: API_BASE_URL from .env (the REST Countries URL with its 10 fields)",
                             _api_url),
        "snapshot_fallback": Parameter(str, "auto", "auto: on for the embedded stack, off otherwise; or true / false",
                                       lambda v: v if str(v).strip().lower() in ("auto", *params.TRUE, *params.FALSE)
                                       else params.bad(f"snapshot_fallback {v!r} is not auto, true or false")),
        "min_records": replace(MIN_RECORDS, help="an answer with fewer records fails the stage"),
        "connect_timeout": Parameter(float, 5.0, "seconds to connect to the API", _positive("connect_timeout")),
        "read_timeout": Parameter(float, 30.0, "seconds to wait for the answer", _positive("read_timeout")),
        "max_attempts": Parameter(int, 4, "tries on connection errors, 5xx and 429", _at_least("max_attempts", 1)),
        "max_total_seconds": Parameter(float, 60.0, "the whole fetch, retries included, never takes longer",
                                       _positive("max_total_seconds")),
        "preview_rows": replace(PREVIEW_ROWS, default=5),
    },
    "clean": {
        "run_id": RUN_ID,
        "input_run": INPUT_RUN,
        "backfill_date": Parameter(str, "", "YYYY-MM-DD: reprocess every raw object of that ingest date instead of "
                                   "this run's", lambda v: v if v == "" or params.DATE.match(v)
                                   else params.bad(f"backfill_date {v!r} is not YYYY-MM-DD")),
        "min_records": replace(MIN_RECORDS, help="a raw object with fewer records fails the stage"),
        "max_invalid_fraction": Parameter(float, 0.05, "more quarantined records than this share fails the stage",
                                          lambda v: v if 0 <= v <= 1 else
                                          params.bad(f"max_invalid_fraction {v} is not between 0 and 1")),
        "silver_format": Parameter(str, "", "csv or parquet; empty: formats.DEFAULT_SILVER in lib/formats.py", _format),
        "preview_rows": PREVIEW_ROWS,
    },
    "load": {
        "run_id": RUN_ID,
        "input_run": INPUT_RUN,
        "db_schema": replace(DB_SCHEMA, help="schema of the target table"),
        "table": replace(TABLE, help="target table; history goes to <table>_history"),
        "write_mode": Parameter(str, "upsert", "upsert (by key), append (new keys only) or replace",
                                _one_of("write_mode", db.WRITE_MODES)),
        "retire_missing": Parameter(bool, True, "upsert: a country absent from the batch leaves the current table "
                                    "(history kept)"),
        "allow_rewind": Parameter(bool, False, "load data older than the table's latest load (takes the table back "
                                  "in time)"),
        "history_country": Parameter(str, "France", "a country whose recorded versions are shown"),
        "preview_rows": PREVIEW_ROWS,
    },
    "export": {
        "run_id": RUN_ID,
        "input_run": INPUT_RUN,
        "db_schema": replace(DB_SCHEMA, help="schema to export from"),
        "table": replace(TABLE, help="the pipeline's table"),
        "export_all_tables": Parameter(bool, False, "also export every other table of the schema (as the original "
                                       "scripts did)"),
        "column_case": Parameter(str, "lower", "CSV header names: lower (the contract's) or upper (the seed's)",
                                 _one_of("column_case", ("lower", "upper"))),
    },
    "gold": {
        "run_id": RUN_ID,
        "input_run": INPUT_RUN,
        "table": replace(TABLE, help="the exported table to bring home"),
        "gold_format": Parameter(str, "", "csv or parquet; empty: formats.DEFAULT_GOLD in lib/formats.py", _format),
        "preview_rows": PREVIEW_ROWS,
    },
}


def reads_a_run(stage: str, values: dict) -> bool:
    """Whether `stage`, given these parameter values, reads the data an earlier stage wrote for one
    run (its own, or the run it is based on): not stage 2 with `backfill_date`, which reads every raw
    object of a date."""
    return stage != registry.first().name and not values.get("backfill_date")


def declared(stage: str) -> dict[str, Parameter]:
    """The parameters of a stage (by its registry name), in the notebook's order."""
    return DECLARED[registry.get(stage).step]


def check(stage: str, name: str, value):
    """Refuse a value of a stage's parameter that is wrong beyond its type (params.UsageError naming
    it); return it unchanged. A name the stage does not declare is refused too."""
    spec = declared(stage).get(name)
    if spec is None:
        raise params.UsageError(f"{stage} has no parameter {name!r}; it has: {', '.join(declared(stage))}")
    if spec.rule is not None:
        try:
            spec.rule(value)
        except params.UsageError:
            raise
        except PipelineError as err:  # names.InvalidName, source.SourceError, formats.FormatError
            raise params.UsageError(str(err)) from None
    return value


def typed(stage: str, name: str, value):
    """A value as the parameter's type: text from a command line or a hand-edited cell is converted
    (`params.convert`), an int is taken for a float; anything else of the wrong type is refused."""
    spec = declared(stage)[name]
    if isinstance(value, str) and spec.type is not str:
        return params.convert(name, value, spec.type_name)
    if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, spec.type) or (spec.type is int and isinstance(value, bool)):
        raise params.UsageError(f"{name}={value!r} is not a {spec.type_name}")
    return value


def values(stage: str, given: dict[str, Any]):
    """The stage's parameters as a typed, frozen object (a dataclass of the declared names): the
    given values typed and checked, the rest their defaults."""
    spec = declared(stage)
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise params.UsageError(f"{stage} has no parameter {', '.join(map(repr, unknown))}; it has: {', '.join(spec)}")
    return _dataclass(stage)(**{n: check(stage, n, typed(stage, n, given[n])) if n in given else p.default
                                for n, p in spec.items()})


_CLASSES: dict[str, type] = {}


def _dataclass(stage: str) -> type:
    if stage not in _CLASSES:
        name = registry.get(stage).step.title() + "Parameters"
        _CLASSES[stage] = dataclasses.make_dataclass(
            name, [(n, p.type, field(default=p.default, metadata={"help": p.help})) for n, p in declared(stage).items()],
            frozen=True)
    return _CLASSES[stage]


def cell(stage: str) -> str:
    """The notebook's `parameters` cell, written from the declaration."""
    def literal(value) -> str:
        return json.dumps(value) if isinstance(value, str) else repr(value)

    return "\n".join(f"{n}: {p.type_name} = {literal(p.default)}" + (f"  # {p.help}" if p.help else "")
                     for n, p in declared(stage).items())


def table() -> str:
    """Every stage's parameters as the Markdown table in docs/runner.md (a test keeps them equal)."""
    lines = ["| stage | parameter | type | default | what it does |", "| --- | --- | --- | --- | --- |"]
    for s in registry.STAGES:
        for n, p in declared(s.name).items():
            default = json.dumps(p.default) if isinstance(p.default, str) else repr(p.default)
            lines.append(f"| `{s.name}` | `{n}` | {p.type_name} | `{default}` | {p.help} |")
    return "\n".join(lines)


JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}
SCHEMA_FILE = registry.NOTEBOOKS.parent / "airflow" / "pipeline_params.schema.json"


def schema() -> dict:
    """The JSON schema of the parameters a scheduled run may set (run ids are the scheduler's): what
    the Airflow DAG validates its `pipeline_params` with, read from `SCHEMA_FILE` (its environment
    cannot import the pipeline; a test keeps the file equal to this)."""
    properties: dict[str, dict] = {}
    for s in registry.STAGES:
        for name, p in declared(s.name).items():
            if name == "run_id":
                continue
            entry = properties.setdefault(name, {"type": JSON_TYPES[p.type], "description": p.help, "stages": []})
            entry["stages"].append(s.name)
    for entry in properties.values():
        entry["description"] = f"{entry['description']} ({', '.join(entry.pop('stages'))})".lstrip()
    return {"type": "object", "additionalProperties": False, "properties": properties}


if __name__ == "__main__":  # python -m lib.stages.parameters: the table for docs/runner.md (--schema: the file)
    print(json.dumps(schema(), indent=2, ensure_ascii=False) if "--schema" in sys.argv[1:] else table())
