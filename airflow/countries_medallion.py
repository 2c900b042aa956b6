"""countries_medallion: the stages of the countries-medallion pipeline, daily, one task each.

Every task runs its stage through the project's own runner, with the project's own Python:

    <python> <home>/airflow/run_stage.py <stage> <run id> --try-number N [--param KEY=VALUE ...]

which runs `run_pipeline.py --stages N --run-id <run id>`, or `run_pipeline.py --resume <run id>` when
the run record shows that the stage's previous attempt did not succeed (an Airflow retry). The runner
keeps the run record, the pipeline lock, the preflight, and the secrets out of notebook parameters;
this DAG only schedules it. One DAG run is one pipeline run, with an id derived from the Airflow run
(`<run type>-<logical date>-<hash of the Airflow run id>`), so every task of a DAG run writes into the
same run record, kept in the records bucket of the object store: the tasks of a run may go to
different workers, each with its own checkout (docs/schedule.md, "One run, many workers").

Settings, read when a task runs (the first one set wins):
- the project folder: the task's `home` (a cluster policy may route stages to checkouts of their
  own), Airflow Variable `medallion_home`, env MEDALLION_HOME, else the folder above this file (when
  the DAG is used straight from a checkout);
- its Python: Variable `medallion_python`, env MEDALLION_PYTHON, else `<home>/.venv/bin/python`.
Read when the DAG is parsed: MEDALLION_RETRIES (default 2) and MEDALLION_RETRY_DELAY in seconds
(default 300). The pipeline's own settings (.env, or the environment of the worker) are the runner's.
Trigger with `{"pipeline_params": {"table": "capitals_clean"}}` to pass notebook parameters; each stage
gets the ones its notebook declares.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from airflow.providers.standard.hooks.subprocess import SubprocessHook
from airflow.sdk import DAG, BaseOperator, Param, Variable, chain
from airflow.sdk.exceptions import AirflowException, AirflowFailException



def declared_stages() -> tuple[str, ...]:
    """The stages in order, as the project's lib/registry.py declares them (a pure-Python module, so
    Airflow's own environment can read it). The project is MEDALLION_HOME, or the folder above this file."""
    home = Path(os.environ.get("MEDALLION_HOME") or Path(__file__).resolve().parents[1])
    sys.path.insert(0, str(home))
    try:
        from lib import registry
    except ImportError as err:
        raise RuntimeError(f"cannot read the stages from {home}/lib/registry.py ({err}): set MEDALLION_HOME "
                           "to the countries-medallion checkout") from None
    finally:
        sys.path.remove(str(home))
    return registry.NAMES


STAGES = declared_stages()
# The parameters a run may set, as lib/stages/parameters.py declares them (written out beside this
# file, since this environment cannot import the pipeline): a key no stage declares, or a value of
# the wrong type, is refused when the DAG is triggered.
PARAMS_SCHEMA = json.loads((Path(__file__).resolve().parent / "pipeline_params.schema.json").read_text(encoding="utf-8"))
EXIT_USAGE = 2  # run_pipeline.py: bad arguments or configuration, nothing ran; retrying cannot help
RETRIES = int(os.environ.get("MEDALLION_RETRIES", "2"))
RETRY_DELAY = timedelta(seconds=float(os.environ.get("MEDALLION_RETRY_DELAY", "300")))


def setting(variable: str, env: str) -> str | None:
    return Variable.get(variable, default=None) or os.environ.get(env) or None


def project_paths(home: str | None = None) -> tuple[Path, Path]:
    """The project folder (`home`, else the settings) and the Python of its virtual environment."""
    home = Path(home or setting("medallion_home", "MEDALLION_HOME") or Path(__file__).resolve().parents[1])
    python = Path(setting("medallion_python", "MEDALLION_PYTHON") or home / ".venv" / "bin" / "python")
    if not (home / "run_pipeline.py").is_file():
        raise AirflowFailException(f"{home} is not a countries-medallion checkout (no run_pipeline.py): "
                                   "set the Airflow Variable medallion_home or MEDALLION_HOME")
    if not os.access(python, os.X_OK):
        raise AirflowFailException(f"{python} is not an executable Python: run `make .venv/.installed` in "
                                   f"{home}, or set the Variable medallion_python or MEDALLION_PYTHON")
    return home, python


def pipeline_run_id(dag_run) -> str:
    """One pipeline run id per DAG run, the same in every task: run type, the logical date (or, for a
    run without one, when it was due) and a hash of the Airflow run id. Valid for lib/names.run_id."""
    when = (dag_run.logical_date or dag_run.run_after).astimezone(timezone.utc)
    kind = re.sub(r"[^a-z0-9_]", "", str(getattr(dag_run.run_type, "value", dag_run.run_type)).lower()) or "run"
    digest = hashlib.sha256(dag_run.run_id.encode("utf-8")).hexdigest()[:8]
    return f"{kind[:24]}-{when:%Y%m%dT%H%M%SZ}-{digest}"


def parameter_text(value) -> str:
    """A parameter as run_pipeline.py's `-p KEY=VALUE` reads it (true/false for booleans)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


class MedallionStage(BaseOperator):
    """Runs one pipeline stage through the project's runner; its output goes to the task log."""

    ui_color = "#e8d9b5"

    def __init__(self, *, stage: str, home: str | None = None, **kwargs):
        super().__init__(task_id=stage, **kwargs)
        self.stage = stage
        self.home = home  # this task's checkout; None: the Variable, MEDALLION_HOME or this file's
        self.hook: SubprocessHook | None = None

    def execute(self, context):
        home, python = project_paths(self.home)
        run_id = pipeline_run_id(context["dag_run"])
        try_number = context["ti"].try_number
        command = [str(python), str(home / "airflow" / "run_stage.py"), self.stage, run_id,
                   "--try-number", str(try_number)]
        for key, value in sorted((context["params"].get("pipeline_params") or {}).items()):
            command += ["--param", f"{key}={parameter_text(value)}"]
        self.log.info("stage %s of pipeline run %s (Airflow run %s, try %s) in %s", self.stage, run_id,
                      context["dag_run"].run_id, try_number, home)
        self.hook = SubprocessHook()
        # Unbuffered, so the runner's lines reach the task log as they happen.
        result = self.hook.run_command(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=str(home))
        if result.exit_code == 0:
            return run_id
        message = (f"stage {self.stage} of pipeline run {run_id} exited with {result.exit_code}: {result.output}; "
                   f"the run record is in the records bucket under runs/{run_id}/, and outputs/runs/{run_id}/ "
                   f"under {home} (or PIPELINE_OUTPUTS_DIR) is this worker's copy")
        if result.exit_code == EXIT_USAGE:
            raise AirflowFailException(message)
        raise AirflowException(message)

    def on_kill(self) -> None:
        # The runner takes SIGTERM as an interruption: the record says `interrupted`, a retry resumes it.
        if self.hook is not None:
            self.hook.send_sigterm()


with DAG(
    dag_id="countries_medallion",
    description="REST Countries → raw → clean → PostgreSQL → cloud export → gold, via run_pipeline.py",
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,  # the runner's lock refuses a second run against the same database anyway
    default_args={"retries": RETRIES, "retry_delay": RETRY_DELAY},
    params={"pipeline_params": Param({}, **PARAMS_SCHEMA,
                                     description="stage parameters for the run, e.g. {\"table\": \"capitals_clean\"} "
                                                 "(`run_pipeline.py params` lists them); never secrets (they come "
                                                 "from the worker's environment or .env)")},
    doc_md=__doc__,
    tags=["countries-medallion"],
) as dag:
    chain(*(MedallionStage(stage=stage) for stage in STAGES))
