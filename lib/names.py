"""Validation of every name a user can supply: run ids, buckets, prefixes, SQL identifiers.

Each check returns the name unchanged or raises ``InvalidName`` saying what is wrong with it, so a bad
value is refused before anything is written.
"""

from __future__ import annotations

import re

from lib.errors import EXIT_USAGE, PipelineError

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# S3 bucket naming rules (the subset every S3 implementation accepts).
BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
PREFIX_PART = re.compile(r"^[A-Za-z0-9_.=-]+$")
SQL_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class InvalidName(PipelineError, ValueError):
    """A user-supplied name that is not safe to use."""

    exit_code = EXIT_USAGE


def run_id(value: str) -> str:
    if not isinstance(value, str) or not RUN_ID.match(value) or ".." in value:
        raise InvalidName(
            f"run id {value!r} is not allowed: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return value


def bucket(value: str) -> str:
    if (
        not isinstance(value, str)
        or not BUCKET.match(value)
        or ".." in value
        or re.match(r"^\d+\.\d+\.\d+\.\d+$", value)
    ):
        raise InvalidName(
            f"bucket name {value!r} is not allowed: use 3-63 lower-case letters, digits, '.' or '-', "
            "starting and ending with a letter or digit"
        )
    return value


def prefix(value: str) -> str:
    """An object key prefix such as ``Raines`` or ``exports/countries`` (no leading or trailing '/')."""
    parts = value.split("/") if isinstance(value, str) else [""]
    if value == "":
        return value
    if any(p in ("", ".", "..") or not PREFIX_PART.match(p) for p in parts):
        raise InvalidName(
            f"key prefix {value!r} is not allowed: use '/'-separated parts of letters, digits, "
            "'_', '.', '=' or '-' (no empty, '.' or '..' parts)"
        )
    return value


def sql_identifier(value: str, what: str = "identifier") -> str:
    """A schema, table or column name: lower-case, so it means the same quoted or not."""
    if not isinstance(value, str) or not SQL_IDENTIFIER.match(value):
        raise InvalidName(
            f"{what} {value!r} is not allowed: use 1-63 lower-case letters, digits or '_', "
            "starting with a letter or '_'"
        )
    return value


SYSTEM_SCHEMAS = ("information_schema", "pg_catalog", "pg_toast")


def schema(value: str) -> str:
    """A schema the pipeline may write to: a valid identifier that is not one of PostgreSQL's own
    (information_schema, pg_catalog, pg_toast, or anything starting with pg_, which is reserved)."""
    sql_identifier(value, "schema")
    if value in SYSTEM_SCHEMAS or value.startswith("pg_"):
        raise InvalidName(f"schema {value!r} is a system schema of PostgreSQL: choose another db_schema")
    return value
