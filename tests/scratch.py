"""Scratch copies of the project, for tests that change it or run its commands as a reader would.

A copy holds the project's files that git tracks or would (nothing it ignores). `link_venvs` gives it the suite's own virtual environments
(`.venv`, the one running the suite, and `.venv-airflow` beside it) as folders of links to theirs,
with make's markers fresh, so that `make run` and the other targets find them installed and never
install anything. The copy lives outside pytest's temporary folder: pytest resets that to mode 0700
when another session starts, and PostgreSQL's system user must reach a stack's state folder in it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAKE_MARKERS = (".installed", ".installed-dev")  # the Makefile's: a venv whose requirements are in


def copy_project(dest: Path) -> Path:
    """The project's files as git sees them (tracked, or new and not ignored), copied to `dest`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, listed.decode().split("\0")):
        source = ROOT / rel
        if source.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)
    return dest


def link_venvs(project: Path) -> None:
    """`.venv` and `.venv-airflow` (when the suite has one) in `project`, linking the suite's."""
    suite = Path(sys.prefix)
    for name, real in ((".venv", suite), (".venv-airflow", suite.parent / ".venv-airflow")):
        if not real.is_dir():
            continue
        folder = project / name
        folder.mkdir()
        for entry in real.iterdir():
            if entry.name not in MAKE_MARKERS:
                (folder / entry.name).symlink_to(entry)
        for marker in MAKE_MARKERS:
            (folder / marker).touch()  # newer than the copied requirements: nothing to install


def new_project() -> Path:
    """A scratch copy of the project with the venvs linked, in a fresh temporary folder (the caller
    removes `path.parent`). PostgreSQL's system user may pass through it: as root, the embedded stack
    runs `.venv`'s PostgreSQL binaries as that user."""
    base = Path(tempfile.mkdtemp(prefix="medallion-scratch-"))
    base.chmod(0o711)
    project = copy_project(base / "project")
    link_venvs(project)
    return project
