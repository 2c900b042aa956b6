"""Stage parameters: parsing what the user typed (`--stages`, `-p KEY=VALUE`) and checking every value,
with one vocabulary for booleans. The runner checks before any kernel starts; the stage functions
check again with the same rules, so a notebook run by hand refuses the same values."""

from __future__ import annotations

import re

from lib import names, registry
from lib.errors import PipelineError

TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off")
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class UsageError(PipelineError, ValueError):
    """A bad command line or parameter value: exit 2 before anything runs."""

    exit_code = 2


def boolean(value, name: str) -> bool:
    """true/false, 1/0, yes/no, on/off (any case), or a bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise UsageError(f"{name}={value!r} is not a boolean: use true or false")


def _bad(message: str):
    raise UsageError(message)


def _one_of(name: str, choices) -> callable:
    return lambda v: v if v in choices else _bad(f"{name} {v!r} is not one of {', '.join(choices)}")


def _positive(name: str) -> callable:
    return lambda v: v if v > 0 else _bad(f"{name} {v} must be more than 0")


def _checks() -> dict:
    # db, formats and source are imported by the rules that use them (late: they import this module's
    # neighbours; and formats imports pandas, which a run's own process needs for nothing else).
    def db():
        from lib import db

        return db

    def formats():
        from lib import formats

        return formats

    def source():
        from lib import source

        return source

    return {
        "db_schema": names.schema,
        "table": lambda v: names.sql_identifier(v, "table"),
        "write_mode": lambda v: _one_of("write_mode", db().WRITE_MODES)(v),
        "column_case": _one_of("column_case", ("lower", "upper")),
        "backfill_date": lambda v: v if v == "" or DATE.match(v) else _bad(f"backfill_date {v!r} is not YYYY-MM-DD"),
        "snapshot_fallback": lambda v: (v if str(v).strip().lower() in ("auto", *TRUE, *FALSE)
                                        else _bad(f"snapshot_fallback {v!r} is not auto, true or false")),
        "api_url": lambda v: v if v == "" else source().check_url(v),
        **{k: (lambda v: v if v == "" else formats().get(v).name) for k in ("silver_format", "gold_format")},
        "max_invalid_fraction": lambda v: v if 0 <= v <= 1 else _bad(f"max_invalid_fraction {v} is not between 0 and 1"),
        "min_records": lambda v: v if v >= 1 else _bad(f"min_records {v} must be at least 1"),
        "max_attempts": lambda v: v if v >= 1 else _bad(f"max_attempts {v} must be at least 1"),
        "preview_rows": lambda v: v if v >= 0 else _bad(f"preview_rows {v} must not be negative"),
        **{k: _positive(k) for k in ("connect_timeout", "read_timeout", "max_total_seconds")},
    }


def check(name: str, value):
    """Refuse a value that is wrong beyond its type (UsageError naming it); return it unchanged."""
    rule = _checks().get(name)
    if rule is None:
        return value
    try:
        rule(value)
    except UsageError:
        raise
    except PipelineError as err:  # names.InvalidName, source.SourceError, ...
        raise UsageError(str(err)) from None
    return value


def parse_stages(spec: str) -> list[str]:
    """'1-5', '2-4', '3', '1,3,5' → stage names, in pipeline order."""
    chosen: set[int] = set()
    last_number = registry.STAGES[-1].number
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise UsageError(f"--stages {spec!r}: {part!r} is not a stage number or a range like 2-4")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if first > last:
            raise UsageError(f"--stages {spec!r}: range {part} runs backwards")
        for n in range(first, last + 1):
            if registry.by_number(n) is None:
                raise UsageError(f"--stages {spec!r}: there is no stage {n} (stages are 1-{last_number})")
            chosen.add(n)
    return [registry.by_number(n).name for n in sorted(chosen)]


def declared(stage: str) -> dict:
    """The parameters a stage notebook declares (papermill reads its `parameters` cell)."""
    from lib.runner import import_papermill

    return import_papermill().inspect_notebook(str(registry.get(stage).notebook))


def convert(key: str, raw: str, type_name: str):
    """A command-line string → the type the notebook declares."""
    try:
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        if type_name == "bool":
            return boolean(raw, key)
    except (ValueError, UsageError):
        raise UsageError(f"-p {key}={raw!r}: expected a value of type {type_name}") from None
    return raw


def parse(pairs: list[str], stages: list[str]) -> dict[str, dict]:
    """-p KEY=VALUE pairs → {stage: {key: typed, checked value}} for the chosen stages that declare KEY."""
    known = {s: declared(s) for s in stages}
    out: dict[str, dict] = {s: {} for s in stages}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"-p {pair!r}: use KEY=VALUE")
        if key == "run_id":
            raise UsageError("-p run_id: use --run-id")
        takers = [s for s in stages if key in known[s]]
        if not takers:
            listed = sorted({k for d in known.values() for k in d} - {"run_id"})
            raise UsageError(f"-p {key}: no chosen stage has a parameter {key!r}; known: {', '.join(listed)}")
        for s in takers:
            value = convert(key, raw, known[s][key]["inferred_type_name"])
            try:
                check(key, value)
            except UsageError as err:
                raise UsageError(f"-p {key}: {err}") from None
            out[s][key] = value
    return out
