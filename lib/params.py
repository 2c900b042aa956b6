"""Parsing what the user typed: `--stages`, `-p KEY=VALUE` (typed as the stage declares), and one
vocabulary for booleans. Only parsing: the parameters and the rules a value must pass beyond its
type are the stages' (lib/stages/parameters.py), handed in by the caller."""

from __future__ import annotations

import re

from lib import registry
from lib.errors import EXIT_USAGE, PipelineError

TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off")
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class UsageError(PipelineError, ValueError):
    """A bad command line or parameter value: exit 2 before anything runs."""

    exit_code = EXIT_USAGE


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


def bad(message: str):
    """Raise UsageError (for rules written as expressions)."""
    raise UsageError(message)


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


def parse(pairs: list[str], known: dict[str, dict[str, str]],
          check=lambda stage, key, value: value) -> dict[str, dict]:
    """-p KEY=VALUE pairs → {stage: {key: typed, checked value}} for the chosen stages that declare
    KEY. `known` maps each chosen stage to its parameters' type names (`int`, `float`, `bool`, `str`);
    `check(stage, key, value)` refuses a value with UsageError."""
    stages = list(known)
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
            value = convert(key, raw, known[s][key])
            try:
                check(s, key, value)
            except UsageError as err:
                raise UsageError(f"-p {key}: {err}") from None
            out[s][key] = value
    return out
