"""docker-compose.yml as Docker Compose reads it: the file, its variables interpolated from `.env` values
(Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`, `${VAR?message}`,
`${VAR:+other}`, `$VAR` and `$$`), for the tests that check it and stand in for its services."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"

_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
                       r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


class InterpolationError(ValueError):
    """A `${VAR:?message}` (or `${VAR?message}`) whose variable is missing: Compose refuses the file."""


def interpolate(value, env: dict[str, str]):
    """`value` (a string, or lists and mappings of them) with Compose's variables replaced from `env`."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["plain"]
        op, arg = match["op"], match["arg"] or ""
        present = name in env
        filled = present and env[name] != ""
        if op in (":-", "-"):
            return env[name] if (filled if op == ":-" else present) else arg
        if op in (":?", "?"):
            if not (filled if op == ":?" else present):
                raise InterpolationError(f"{name}: {arg}")
            return env[name]
        if op in (":+", "+"):
            return arg if (filled if op == ":+" else present) else ""
        return env.get(name, "")

    return _VARIABLE.sub(replace, value)


def raw() -> dict:
    """docker-compose.yml as written."""
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def load(env: dict[str, str]) -> dict:
    """docker-compose.yml with its variables taken from `env` (what `docker compose config` shows)."""
    return interpolate(raw(), env)
