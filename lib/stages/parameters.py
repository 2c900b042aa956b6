"""The rules every stage parameter must pass beyond its type. The runner checks `-p` values with
them before any kernel starts (this module imports nothing heavy), and `context.begin` checks them
again, so a notebook run by hand refuses the same values."""

from __future__ import annotations

from lib import db, formats, names, params, source
from lib.errors import PipelineError


def _one_of(name: str, choices) -> callable:
    return lambda v: v if v in choices else params.bad(f"{name} {v!r} is not one of {', '.join(choices)}")


def _positive(name: str) -> callable:
    return lambda v: v if v > 0 else params.bad(f"{name} {v} must be more than 0")


# Each rule returns the value or raises a PipelineError saying what is wrong with it.
RULES = {
    "db_schema": names.schema,
    "table": lambda v: names.sql_identifier(v, "table"),
    "write_mode": _one_of("write_mode", db.WRITE_MODES),
    "column_case": _one_of("column_case", ("lower", "upper")),
    "backfill_date": lambda v: v if v == "" or params.DATE.match(v) else params.bad(f"backfill_date {v!r} is not YYYY-MM-DD"),
    "snapshot_fallback": lambda v: (v if str(v).strip().lower() in ("auto", *params.TRUE, *params.FALSE)
                                    else params.bad(f"snapshot_fallback {v!r} is not auto, true or false")),
    "api_url": lambda v: v if v == "" else source.check_url(v),
    **{k: (lambda v: v if v == "" else formats.get(v).name) for k in ("silver_format", "gold_format")},
    "max_invalid_fraction": lambda v: v if 0 <= v <= 1 else params.bad(f"max_invalid_fraction {v} is not between 0 and 1"),
    "min_records": lambda v: v if v >= 1 else params.bad(f"min_records {v} must be at least 1"),
    "max_attempts": lambda v: v if v >= 1 else params.bad(f"max_attempts {v} must be at least 1"),
    "preview_rows": lambda v: v if v >= 0 else params.bad(f"preview_rows {v} must not be negative"),
    **{k: _positive(k) for k in ("connect_timeout", "read_timeout", "max_total_seconds")},
}


def check(name: str, value):
    """Refuse a parameter value that is wrong beyond its type (params.UsageError naming it); return
    it unchanged."""
    rule = RULES.get(name)
    if rule is None:
        return value
    try:
        rule(value)
    except params.UsageError:
        raise
    except PipelineError as err:  # names.InvalidName, source.SourceError, formats.FormatError
        raise params.UsageError(str(err)) from None
    return value
