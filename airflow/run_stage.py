#!/usr/bin/env python3
"""One stage of a scheduled run, through run_pipeline.py: a new attempt, or `--resume` when the run
record shows that this stage's last attempt did not succeed.

    python airflow/run_stage.py STAGE RUN_ID [--try-number N] [--param KEY=VALUE ...]

The DAG in countries_medallion.py runs this with the project's own Python, once per task try. It
prints what it decided, then replaces itself with `run_pipeline.py`, so the run record, the lock, the
preflight, the exit code, the stage summary and the executed notebook's path are the runner's own.

`--param` pairs are the run's notebook parameters; each stage gets the ones its notebook declares
(a key no stage declares is refused). A resume reuses the parameters recorded for the run.
Exit codes: run_pipeline.py's (2: a bad stage, run id or parameter; nothing ran).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# This checkout's own library, whatever else the Python could import as `lib` (an editable install of
# another checkout): the decision is made on the checkout that runs the stage.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import config, hints, names, record_store, registry, runner, runs  # noqa: E402
from lib.stages import parameters  # noqa: E402
from lib.errors import EXIT_USAGE, PipelineError  # noqa: E402

RUNNER = config.ROOT / "run_pipeline.py"


class Refused(PipelineError):
    """A stage, run id or parameter this wrapper will not pass on."""


def stage_parameters(pairs: list[str], stage: str) -> list[str]:
    """The `--param` pairs the stage's notebook declares; a key that no stage declares is an error."""
    if not pairs:
        return []
    declared = {s: parameters.declared(s) for s in registry.NAMES}
    chosen = []
    for pair in pairs:
        key, sep, _ = pair.partition("=")
        if not sep or not key:
            raise Refused(f"--param {pair!r}: use KEY=VALUE")
        if not any(key in d for d in declared.values()):
            known = sorted({k for d in declared.values() for k in d} - {"run_id"})
            raise Refused(f"parameter {key!r} is not declared by any stage; known: {', '.join(known)}")
        if key in declared[stage]:
            chosen.append(pair)
    return chosen


def resumable(record: dict | None, stage: str) -> bool:
    """True when `--resume` would continue exactly at this stage: the run record asks for it last,
    every stage before it succeeded, and it did not (failed, interrupted, killed, or refused by the
    preflight)."""
    if not record:
        return False
    requested = record.get("requested_stages") or []
    if not requested or requested[-1] != stage:
        return False
    statuses = [record.get("stages", {}).get(s, {}).get("status") for s in requested]
    return all(s == "succeeded" for s in statuses[:-1]) and statuses[-1] != "succeeded"


def stored_copy(run_id: str) -> Path:
    """The outputs folder, holding the run's record as the records bucket has it: an earlier task of
    the run may have run on another worker (lib/record_store.py). A store that cannot be read now
    leaves this worker's copy; the runner reads the bucket again, and its preflight says why not."""
    env = config.environment()
    try:
        runner.ensure_stack(env)
        record_store.pull(config.settings(env), run_id)
    except PipelineError as err:
        print(f"run_stage.py: the records bucket could not be read ({err}); deciding from this worker's copy",
              file=sys.stderr)
    return config.outputs_dir(env)


def runner_arguments(stage: str, run_id: str, pairs: list[str], try_number: int) -> tuple[list[str], str]:
    """The run_pipeline.py arguments for this try, and a sentence saying why."""
    number = registry.get(stage).number
    names.run_id(run_id)
    record = runs.read_json(runs.manifest_path(stored_copy(run_id), run_id))
    chosen = stage_parameters(pairs, stage)
    if resumable(record, stage):
        status = record.get("stages", {}).get(stage, {}).get("status") or "not run (its preflight failed)"
        return ["--resume", run_id], (f"try {try_number}: the run record shows {stage} {status} "
                                      f"→ resuming run {run_id} with its own parameters")
    args = ["--stages", str(number), "--run-id", run_id]
    for pair in chosen:
        args += ["-p", pair]
    done = [s for s, e in (record or {}).get("stages", {}).items() if e.get("status") == "succeeded"]
    return args, (f"try {try_number}: running {stage} of run {run_id} "
                  f"(succeeded so far: {', '.join(done) or 'nothing'})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="run_stage.py", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", help=f"one of {', '.join(registry.NAMES)}")
    p.add_argument("run_id")
    p.add_argument("--try-number", type=int, default=1, help="the scheduler's try number (shown only)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        runner_args, why = runner_arguments(args.stage, args.run_id, args.param, args.try_number)
    except PipelineError as err:
        print(f"run_stage.py: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    command = [sys.executable, str(RUNNER), *runner_args]
    print(why)
    print("$ " + hints.command(*runner_args), flush=True)  # what runs, as it would be typed in the checkout
    sys.stderr.flush()
    os.chdir(config.ROOT)
    os.execv(sys.executable, command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
