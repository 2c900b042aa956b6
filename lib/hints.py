"""A command of this project as a message prints it — how to resume a run, run a stage again, start or
stop the stack — spelled so that it runs as printed, pasted into a shell in the project folder.

The runner is named with the Python running now: `.venv/bin/python` when that is the project's own
virtual environment (`make run`, `make lab`'s kernels), else the interpreter's full path (a
scheduler's worker, another venv); never a bare `python`, which is often one without the project's
packages. `run_pipeline.py` started by such a Python prints `missing_packages` and exits 2. Only the
standard library is imported here, so that it can say so."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ".venv/bin/python"  # the project's Python, relative to the project folder (Makefile `BIN`)


def interpreter() -> str:
    """The Python a hint names: the running one, relative when it is the project's `.venv`."""
    exe = Path(os.path.abspath(sys.executable))
    if exe.parent.resolve() == (_ROOT / VENV_PYTHON).parent.resolve():
        return f"{Path(VENV_PYTHON).parent}/{exe.name}"
    return str(exe)


def command(*args: str, python: str | None = None) -> str:
    """`run_pipeline.py ARGS` as a hint prints it (shell-quoted), with `python` or the running one."""
    return shlex.join([python or interpreter(), "run_pipeline.py", *args])


def missing_packages(missing: ModuleNotFoundError, args: list[str]) -> str:
    """The one line run_pipeline.py prints when the Python running it lacks the project's packages:
    the same command with the project's Python, made first by make when there is no `.venv` yet."""
    instead = command(*args, python=VENV_PYTHON)
    if not (_ROOT / VENV_PYTHON).exists():
        instead = f"make {Path(VENV_PYTHON).parent.parent}/.installed && {instead}"  # the Makefile's target
    return (f"run_pipeline.py: {sys.executable} lacks the project's packages (no module named {missing.name!r}); "
            f"from {_ROOT} run: {instead}")
